"""Shared fixtures: a copy of the workflow per test, and one demo teacher per session."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from filelock import FileLock

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"

WORKFLOW_FILES = (
    "Snakefile",
    "rules",
    "workflow_scripts",
    "teacher_logits",
    "config",
    "profiles",
    "envs",
    "report",
)


def snakemake_bin() -> str:
    candidate = Path(sys.executable).with_name("snakemake")
    return str(candidate) if candidate.exists() else "snakemake"


class Workflow:
    """A copy of the workflow in a temporary folder, run through the real snakemake CLI."""

    def __init__(self, root: Path, lock_dir: Path):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.lock_dir = lock_dir
        for name in WORKFLOW_FILES:
            source = REPO / name
            if source.is_dir():
                shutil.copytree(source, root / name, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                shutil.copy2(source, root / name)

    def command(self, *args, config: dict | None = None, env: dict | None = None):
        cmd = [snakemake_bin(), *args]
        if config is not None:
            path = self.root / "test_config.yaml"
            path.write_text(yaml.safe_dump(config))
            cmd += ["--configfile", str(path)]
        full_env = {**os.environ, "TEACHER_LOGITS_GPU_LOCK_DIR": str(self.lock_dir), **(env or {})}
        return cmd, full_env

    def run(
        self,
        *args,
        config: dict | None = None,
        check: bool = True,
        env: dict | None = None,
        timeout: int = 900,
        **popen_kwargs,
    ) -> subprocess.CompletedProcess:
        cmd, full_env = self.command(*args, config=config, env=env)
        result = subprocess.run(
            cmd,
            cwd=self.root,
            env=full_env,
            capture_output=True,
            text=True,
            timeout=timeout,
            **popen_kwargs,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout[-4000:]}\n"
                f"{result.stderr[-8000:]}"
            )
        return result

    def start(self, *args, config: dict | None = None, env: dict | None = None) -> subprocess.Popen:
        """Run snakemake in the background, in its own process group (kill it with ``killpg``)."""
        cmd, full_env = self.command(*args, config=config, env=env)
        log = open(self.root / f"background-{len(list(self.root.glob('background-*')))}.log", "w")
        return subprocess.Popen(
            cmd,
            cwd=self.root,
            env=full_env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def path(self, *parts) -> Path:
        return self.root.joinpath(*parts)

    def manifest(self, output_dir="results/demo") -> dict:
        return json.loads(self.path(output_dir, "manifest.json").read_text())


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory) -> Path:
    """The demo corpus and teacher, built once through the workflow's own rules."""
    cached = os.environ.get("TEACHER_LOGITS_TEST_DEMO_DIR")
    if cached and (Path(cached) / "teacher" / "config.json").exists():
        return Path(cached)
    # Under pytest-xdist (the slow tier) the workers share one build, made by whichever
    # asks first: the folder above each worker's base temp is the run's.
    shared = os.environ.get("PYTEST_XDIST_WORKER") is not None
    base = tmp_path_factory.getbasetemp()
    root = base.parent / "demo_build" if shared else tmp_path_factory.mktemp("demo_build")
    demo = root / "demo"
    with FileLock(str(root) + ".lock"):
        if not (demo / "teacher" / "config.json").exists():
            wf = Workflow(root, root / "locks")
            wf.run("--cores", "2", str(demo / "teacher"), config={"demo": {"dir": str(demo)}})
    assert (demo / "teacher" / "config.json").exists()
    assert (demo / "corpus.jsonl").exists()
    return demo


def demo_workflow(root: Path, demo_dir: Path) -> Workflow:
    """A workflow copy in ``root/wf`` whose default demo location is the session's demo."""
    wf = Workflow(root / "wf", root / "locks")
    # Nothing is rebuilt: the demo teacher and corpus are built once per session.
    (wf.root / "resources").mkdir()
    (wf.root / "resources" / "demo").symlink_to(demo_dir)
    return wf


@pytest.fixture
def workflow(tmp_path, demo_dir) -> Workflow:
    return demo_workflow(tmp_path, demo_dir)


def small_teacher(arch: str, demo_dir, out, extra_vocab: int = 0):
    """A random teacher of another architecture, with the demo tokenizer beside it
    (``extra_vocab`` unused rows after the tokenizer's, as padded vocabularies have)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(demo_dir / "teacher")
    torch.manual_seed(0)
    if arch == "gpt2":  # learned absolute positions: wrong under left padding
        config = AutoConfig.for_model(
            "gpt2",
            vocab_size=len(tokenizer) + extra_vocab,
            n_embd=64,
            n_layer=2,
            n_head=4,
            n_positions=1024,
        )
    else:  # gemma2: final logit soft-capping after lm_head, so the head is not chunked
        config = AutoConfig.for_model(
            "gemma2",
            vocab_size=len(tokenizer) + extra_vocab,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            final_logit_softcapping=3.0,
        )
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
