"""The house rules the code keeps: a torch-free package import, one owner per
convention (paths, `gpus`, user errors), small modules, and one line per user error."""

import re
import subprocess
import sys

import pytest

from teacher_logits import errors

from conftest import REPO

PACKAGE = REPO / "teacher_logits"
LIBRARY = sorted(PACKAGE.rglob("*.py"))
WORKFLOW_CODE = LIBRARY + sorted((REPO / "workflow_scripts").glob("*.py"))
WORKFLOW_CODE += [REPO / "Snakefile", *sorted((REPO / "rules").glob("*.smk"))]


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )


def test_importing_the_package_and_its_store_pulls_in_no_torch():
    result = run_python(
        "import sys\n"
        "import teacher_logits, teacher_logits.store, teacher_logits.gpus, teacher_logits.layout\n"
        "import teacher_logits.status, teacher_logits.verify, teacher_logits.settings\n"
        "import teacher_logits.cli, teacher_logits.info, teacher_logits.export\n"
        "import teacher_logits.store.views\n"
        "from teacher_logits import LogitStore\n"
        "heavy = {'torch', 'transformers', 'snakemake', 'datasets'} & {m.split('.')[0] for m in sys.modules}\n"
        "assert not heavy, heavy\n"
    )
    assert result.returncode == 0, result.stderr


def test_no_module_is_over_about_400_lines():
    sizes = {p.relative_to(REPO): len(p.read_text().splitlines()) for p in LIBRARY}
    assert {p: n for p, n in sizes.items() if n > 420} == {}


def test_gpus_is_parsed_in_one_place():
    callers = [p for p in WORKFLOW_CODE if "parse_gpus(" in p.read_text()]
    assert callers == [PACKAGE / "gpus.py"]


# Literals that spell a path of the output layout; only layout.py may hold them.
LAYOUT_PATTERNS = [
    r"shard_\{",
    r"\"\.partial\"",
    r"progress\.json",
    r"\"index\.h5\"",
    r"\"manifest\.json\"",
    r"\"tokens\.h5\"",
    r"\"plan\.json\"",
    r"\.parts\"",
    r"\"prepared/",
    r"/ \"prepared\"",
    r"/ \"shards\"",
    r"\"shards/",
    r"\.run\.lock",
]


def test_output_layout_paths_are_spelled_only_in_run_layout():
    offenders = []
    for path in WORKFLOW_CODE:
        if path == PACKAGE / "layout.py":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if any(re.search(pattern, code) for pattern in LAYOUT_PATTERNS):
                offenders.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert offenders == []


def user_error_kinds():
    kinds = [errors.UserError]
    kinds += [
        k for k in vars(errors).values() if isinstance(k, type) and issubclass(k, errors.UserError)
    ]
    return sorted(set(kinds), key=lambda k: k.__name__)


@pytest.mark.parametrize("kind", user_error_kinds(), ids=lambda k: k.__name__)
def test_each_user_error_reaches_the_console_as_one_line(tmp_path, kind):
    log = tmp_path / "job.log"
    result = run_python(
        "from teacher_logits import errors\n"
        "from teacher_logits.job import run_job\n"
        "def main():\n"
        f"    raise errors.{kind.__name__}('something is wrong; do this to fix it')\n"
        f"run_job('x', {str(log)!r}, main)\n"
    )
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert lines == ["[x] ERROR: something is wrong; do this to fix it"], result.stderr
    assert "something is wrong" in log.read_text() and "Traceback" not in log.read_text()


def test_the_offload_error_reaches_the_console_as_one_line(tmp_path):
    """A teacher too big for its group's GPUs: the check that refuses device_map
    offloading raises a user error, which the job harness prints as one line."""
    result = run_python(
        "from teacher_logits.generation.teacher import refuse_offload\n"
        "from teacher_logits.job import run_job\n"
        "device_map = {'model.embed_tokens': 0, 'model.layers.0': 1, 'model.layers.1': 'cpu'}\n"
        f"run_job('generate', {str(tmp_path / 'g.log')!r}, refuse_offload, device_map, 141 * 2**30, False)\n"
    )
    assert result.returncode == 1
    (line,) = result.stderr.strip().splitlines()
    assert "does not fit the GPUs of this group" in line and "gpus_per_model" in line
    assert "teacher.allow_offload: true" in line and "~141.0 GiB" in line
    assert (
        run_python(
            "from teacher_logits.generation.teacher import refuse_offload\n"
            "refuse_offload({'model.layers.1': 'cpu'}, 2**30, allow_offload=True)\n"
            "refuse_offload({'model.layers.1': 0, 'lm_head': 1}, 2**30, allow_offload=False)\n"
        ).returncode
        == 0
    )


def pins(text: str) -> dict:
    found = re.findall(r"^\s*(?:- )?\"?([A-Za-z0-9_.\-]+)==([^\s#\",]+)", text, re.M)
    return {name.lower(): version for name, version in found}


def test_the_pinned_stack_is_the_same_everywhere():
    """requirements.txt, environment.yml (users), envs/workflow.yaml (--use-conda jobs)
    and the `workflow` extra of pyproject.toml name the same versions."""
    requirements = pins((REPO / "requirements.txt").read_text())
    assert requirements and "torch" in requirements
    assert pins((REPO / "environment.yml").read_text()) == requirements
    assert pins((REPO / "envs" / "workflow.yaml").read_text()) == requirements
    extra = pins((REPO / "pyproject.toml").read_text())
    assert extra and all(requirements[name] == version for name, version in extra.items())
