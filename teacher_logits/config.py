"""Config checks and derived paths that run at plan time: no torch, no transformers.

``common.smk`` calls these while Snakemake parses the workflow, so a bad value is
reported before any job starts; ``settings`` uses the same helpers to find files.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
from pathlib import Path

from .errors import ConfigError
from .sampling import sampled_stand_ins
from .temperatures import normalise_temperatures

DEMO = "demo"
DATASET_SUFFIXES = (".jsonl", ".json", ".parquet", ".arrow")

# Settings that change the meaning of the stored numbers; everything else (GPUs,
# batch sizes, paths, thread counts) may change without discarding finished shards.
MEANING_KEYS = {
    "teacher": ("dtype", "attn_implementation", "trust_remote_code"),
    # Not max_samples (nor num_shards): more rows are appended as new shards.
    "dataset": ("split", "text_field", "messages_field"),
    "tokenize": ("max_length",),
    "generation": ("top_k", "store_entropy"),
    "storage": ("value_dtype",),
}

# Meaning keys added after format version 1 shipped (chat data, loss masks, long
# documents, temperatures). Each enters the fingerprint only when it differs from the behaviour
# that existed before it, so upgrading the workflow keeps finished shards.
# (section, key): the value that reproduces the old behaviour.
ADDED_MEANING_DEFAULTS = {
    ("tokenize", "overflow"): "truncate",
    ("tokenize", "split_special_tokens"): False,
    ("generation", "store_masked_only"): False,
    ("generation", "temperatures"): [1.0],
    ("generation", "mode"): "topk",
    ("generation", "top_p"): None,
}
KNOWN_ROLES = ("system", "developer", "user", "assistant", "tool", "function", "ipython")


def _yaml_fix(problem: str) -> str:
    if "\\t" in problem:
        return "indent with spaces, not tabs"
    if "mapping values are not allowed" in problem:
        return "put a space after each 'key:' and quote a value that holds ': '"
    if "expected <block end>" in problem:
        return "indent the keys of one section by the same number of spaces"
    return "fix the YAML there (see config/README.md)"


def check_config_file(path: str | os.PathLike) -> str:
    """A config file that does not parse, as one line naming the file, line, column and fix
    (Snakemake's own message names neither file nor line). Returns ``path``."""
    import yaml

    file = Path(path)
    if not file.is_file():
        return path  # Snakemake reports a missing file itself
    raw = file.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise ConfigError(
            f"config file {path}, line {line}: not valid UTF-8 ({exc.reason}); save the file "
            "as UTF-8"
        ) from None
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"config file {path}{where}: {problem}; {_yaml_fix(problem)}") from None
    if not isinstance(value, dict):
        what = "nothing" if value is None else f"a {type(value).__name__}"
        raise ConfigError(
            f"config file {path} holds {what}, not keys; write it as 'key: value' lines "
            "(see config/README.md)"
        )
    return path


def check_unknown_keys(config: dict, schema: dict, where: str = "") -> None:
    """Refuse keys the schema does not know, naming the closest known key."""
    properties = schema.get("properties", {})
    for key, value in config.items():
        if key not in properties:
            close = difflib.get_close_matches(str(key), list(properties), n=1)
            hint = f"; did you mean '{where}{close[0]}'?" if close else ""
            known = ", ".join(sorted(properties))
            raise ConfigError(f"unknown config key '{where}{key}'{hint} (known keys here: {known})")
        sub = properties[key]
        if isinstance(value, dict) and sub.get("type") == "object" and "properties" in sub:
            check_unknown_keys(value, sub, f"{where}{key}.")


TRUE_WORDS = {"true", "yes", "on", "1"}
FALSE_WORDS = {"false", "no", "off", "0"}


def coerce_command_line_values(config: dict, schema: dict) -> None:
    """``--config flag=true`` arrives as the string 'true': turn such words into booleans."""
    for key, sub in schema.get("properties", {}).items():
        value = config.get(key)
        if sub.get("type") == "boolean" and isinstance(value, str):
            word = value.strip().lower()
            if word in TRUE_WORDS | FALSE_WORDS:
                config[key] = word in TRUE_WORDS
        elif isinstance(value, dict) and sub.get("type") == "object":
            coerce_command_line_values(value, sub)


TYPE_WORDS = {
    "integer": "a whole number",
    "number": "a number",
    "string": "a string",
    "boolean": "true or false",
    "array": "a list",
    "object": "a section of keys",
    "null": "empty",
}


def _schema_fix(error, where: str) -> str:
    """How to fix one schema violation, in words a user acts on."""
    kind, allowed, value = error.validator, error.validator_value, error.instance
    if kind == "type":
        types = allowed if isinstance(allowed, list) else [allowed]
        if "object" in types:
            if "path" in error.schema.get("properties", {}) and isinstance(value, str):
                return f"{where} is a section: write it as '{where}: {{path: {value}}}'"
            return f"{where} is a section: put its keys under it (see config/README.md)"
        want = " or ".join(TYPE_WORDS.get(t, t) for t in types)
        about = error.schema.get("description")
        return f"set {where} to {want}" + (f" ({about})" if about else "")
    if kind == "enum":
        return f"use one of: {', '.join(str(v) for v in allowed)}"
    if kind in ("minimum", "exclusiveMinimum"):
        return f"use a value of at least {allowed}{' (exclusive)' if kind != 'minimum' else ''}"
    if kind in ("maximum", "exclusiveMaximum"):
        return f"use a value of at most {allowed}"
    if kind == "minLength":
        return f"give {where} a non-empty value"
    return "see config/README.md for the allowed values"


def check_schema(config: dict, schema: dict) -> None:
    """The first schema violation as ``key.path: problem; fix``."""
    import jsonschema

    validator = jsonschema.Draft202012Validator(schema)
    error = jsonschema.exceptions.best_match(validator.iter_errors(config))
    if error is not None:
        where = ".".join(str(p) for p in error.absolute_path) or "config"
        problem = f"{where} is empty" if error.instance is None else f"{where}: {error.message}"
        raise ConfigError(f"{problem}; {_schema_fix(error, where)}")


def demo_dir(config: dict) -> Path:
    return Path(config["demo"]["dir"])


def demo_teacher_path(config: dict) -> Path:
    return demo_dir(config) / "teacher"


def demo_corpus_path(config: dict) -> Path:
    return demo_dir(config) / "corpus.jsonl"


def teacher_path(config: dict) -> Path:
    path = config["teacher"]["path"]
    return demo_teacher_path(config) if path == DEMO else Path(path)


def dataset_paths(config: dict) -> list[Path]:
    """``dataset.path``: one path or a list of files, read in list order."""
    path = config["dataset"]["path"]
    if path == DEMO:
        return [demo_corpus_path(config)]
    return [Path(p) for p in (path if isinstance(path, list) else [path])]


PARQUET_MAGIC = b"PAR1"


def _check_output_dir(output_dir: str) -> None:
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output_dir: {out} is a file, not a folder; choose another output_dir")
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(
            f"output_dir: {out} cannot be created because {existing} is a file, not a folder; "
            "choose another output_dir"
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(
            f"output_dir: {out} cannot be written ({existing} is not writable for this user); "
            "choose a writable output_dir or fix the folder's permissions"
        )


def _check_dataset_file(data: Path) -> None:
    """Cheap looks at the dataset itself: empty files, broken Parquet, folders that are no dataset."""
    fix = "give a .jsonl/.json/.parquet/.arrow file or a folder written by save_to_disk"
    if data.is_dir():
        markers = ("dataset_dict.json", "state.json")
        if not any((data / m).is_file() for m in markers):
            raise ConfigError(
                f"dataset.path: {data} is a folder but not a save_to_disk dataset (it has no "
                f"dataset_dict.json or state.json); {fix}"
            )
        return
    size = data.stat().st_size
    if size == 0:
        raise ConfigError(f"dataset.path: {data} is empty (0 bytes); {fix} with rows in it")
    if data.suffix == ".parquet":
        with open(data, "rb") as handle:
            head = handle.read(4)
            handle.seek(max(0, size - 4))
            tail = handle.read(4)
        if head != PARQUET_MAGIC or tail != PARQUET_MAGIC:
            raise ConfigError(
                f"dataset.path: {data} is not a valid Parquet file (no PAR1 marker at its "
                "start and end: truncated or damaged); copy it again or re-export it"
            )


def teacher_vocab_size(teacher: Path) -> int | None:
    """vocab_size from the teacher's config.json (of its text model), if it states one."""
    try:
        config = json.loads((teacher / "config.json").read_text())
    except (OSError, ValueError):
        return None
    for section in (config, config.get("text_config") or {}):
        if isinstance(section.get("vocab_size"), int):
            return section["vocab_size"]
    return None


def check_paths(config: dict) -> None:
    """File checks that need no torch: output_dir, the teacher folder and the dataset."""
    _check_output_dir(config["output_dir"])
    if config["teacher"]["path"] != DEMO:
        teacher = Path(config["teacher"]["path"])
        if teacher.is_file():
            raise ConfigError(
                f"teacher.path: {teacher} is a file; give the model's folder (the one holding "
                "config.json, the weights and the tokenizer)"
            )
        if not teacher.is_dir():
            raise ConfigError(
                f"teacher.path: folder {teacher} does not exist; give a local Hugging Face model "
                "folder (one with config.json) or 'demo'"
            )
        if not (teacher / "config.json").is_file():
            raise ConfigError(
                f"teacher.path: {teacher} has no config.json, so it is not a Hugging Face model "
                "folder; point it at the folder save_pretrained wrote"
            )
    paths = [] if config["dataset"]["path"] == DEMO else dataset_paths(config)
    if len(paths) > 1 and any(p.is_dir() for p in paths):
        raise ConfigError(
            "dataset.path: a list holds files only; give a save_to_disk folder alone, or "
            "list its files"
        )
    for data in paths:
        if not data.exists():
            raise ConfigError(
                f"dataset.path: {data} does not exist; give a .jsonl/.json/.parquet/.arrow file, "
                "a save_to_disk folder, or 'demo'"
            )
        if data.is_file() and data.suffix not in DATASET_SUFFIXES:
            raise ConfigError(
                f"dataset.path: {data} has suffix '{data.suffix}'; supported are "
                f"{', '.join(DATASET_SUFFIXES)} files or a save_to_disk folder"
            )
        if data.is_file() and not os.access(data, os.R_OK):
            raise ConfigError(f"dataset.path: {data} is not readable; fix its permissions")
        _check_dataset_file(data)
    if config["dataset"]["max_samples"] == 0:
        raise ConfigError("dataset.max_samples=0 keeps no sample; use null for all, or a count")
    # prepare checks this again with transformers; here it fails in a second, before any job.
    vocab = teacher_vocab_size(teacher_path(config))
    top_k = config["generation"]["top_k"]
    if vocab is not None and top_k > vocab:
        raise ConfigError(
            f"generation.top_k={top_k} is larger than the teacher's vocabulary ({vocab}); "
            f"use a top_k of at most {vocab}"
        )


def check_chat_and_overflow(config: dict) -> None:
    """Chat, loss-mask and long-document settings that contradict each other or the disk."""
    ds, tok = config["dataset"], config["tokenize"]
    chat = bool(ds.get("messages_field"))
    template = ds.get("chat_template")
    if template and not chat:
        raise ConfigError(
            "dataset.chat_template is set but dataset.messages_field is null; name the column "
            "holding the conversations in dataset.messages_field, or drop chat_template"
        )
    if template and not Path(template).is_file():
        raise ConfigError(
            f"dataset.chat_template: file {template} does not exist; give a Jinja chat template "
            "file, or null to use the teacher tokenizer's own template"
        )
    if tok.get("split_special_tokens") and chat:
        raise ConfigError(
            "tokenize.split_special_tokens is for plain text only: with dataset.messages_field "
            "the chat template writes special tokens itself, so they cannot be split; set "
            "tokenize.split_special_tokens: false (special-token strings in message contents are "
            "counted in plan.json) or clean the contents"
        )
    if config["generation"].get("store_masked_only") and not chat:
        raise ConfigError(
            "generation.store_masked_only needs a loss mask, which only chat data has; set "
            "dataset.messages_field or set store_masked_only: false"
        )
    if tok.get("overflow") == "split" and int(tok["stride"]) >= int(tok["max_length"]):
        raise ConfigError(
            f"tokenize.stride={tok['stride']} must be smaller than tokenize.max_length="
            f"{tok['max_length']} with overflow: split (each window must move forward); "
            f"use a stride of at most {int(tok['max_length']) // 2}"
        )


def meaning_settings(config: dict) -> dict:
    """The config values that go into ``config_fingerprint`` (no paths)."""
    settings = {
        section: {key: config[section].get(key) for key in keys}
        for section, keys in MEANING_KEYS.items()
    }
    _add_meaning_settings(config, settings)
    return settings


def _add_meaning_settings(config: dict, settings: dict) -> None:
    """Chat, loss-mask and long-document settings, only where they change the numbers."""
    for (section, key), old in ADDED_MEANING_DEFAULTS.items():
        value = config[section].get(key, old)
        if key == "temperatures":  # [2.0], [1, 2] and [1.0, 2.0] store the same numbers
            value = list(normalise_temperatures(value))
        if value != old:
            settings[section][key] = value
    mode = config["generation"].get("mode", "topk")
    if mode != "topk":
        for key, default in (("samples", 16), ("sample_temperature", 1.0)):
            settings["generation"][key] = config["generation"].get(key, default)
    settings.update(sampled_stand_ins(settings))
    if config["tokenize"].get("overflow", "truncate") == "split":
        settings["tokenize"]["stride"] = config["tokenize"].get("stride")
    if config["dataset"].get("messages_field"):
        settings["dataset"]["train_roles"] = sorted(config["dataset"].get("train_roles") or [])
        template = config["dataset"].get("chat_template")
        # The template's text, not its path: moving the file changes nothing stored.
        settings["dataset"]["chat_template_sha256"] = file_digest(template) if template else None


def meaning_settings_json(config: dict, max_samples: int | None) -> str:
    """prepare's params: the meaning settings with a segment's max_samples, as runs
    recorded them before rows could be appended (so upgrading reruns no prepare)."""
    settings = meaning_settings(config)
    settings["dataset"]["max_samples"] = max_samples
    return json.dumps(settings, sort_keys=True)


def file_digest(path: str) -> str | None:
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return None  # reported by check_chat_and_overflow, with the fix


def check_library_source(workflow_dir: str | os.PathLike) -> None:
    """The rule scripts import ``teacher_logits`` from beside the Snakefile, unless a
    regular (not editable) install in this environment comes first on ``sys.path``:
    then the jobs would run other code than this checkout. Refuse that at plan time."""
    from importlib import metadata

    try:
        dist = metadata.distribution("teacher-logits")
    except metadata.PackageNotFoundError:
        return
    direct_url = json.loads(dist.read_text("direct_url.json") or "{}")
    if direct_url.get("dir_info", {}).get("editable"):
        return  # an editable install's finder comes after the scripts' own folder
    installed = Path(str(dist.locate_file("teacher_logits")))
    if installed.resolve() == (Path(workflow_dir) / "teacher_logits").resolve():
        return
    raise ConfigError(
        f"teacher_logits is installed (not editable) at {installed}, and the workflow's jobs "
        f"would import it instead of {Path(workflow_dir) / 'teacher_logits'}; install this "
        f"checkout with `pip install -e {workflow_dir}` (or `pip uninstall teacher-logits`)"
    )


if __name__ == "__main__":  # `python -m teacher_logits.config my.yaml`: where a config file breaks
    import sys

    for name in sys.argv[1:]:
        try:
            check_config_file(name)
        except ConfigError as error:
            sys.exit(f"Config error: {error}")
        print(f"{name}: parses")
