"""deploy/kubernetes/: every document is valid against the Kubernetes schema (kubernetes-validate,
strict: an unknown field fails), the embedded ckpt-watch config validates, the sidecar's command
parses as a real `ckpt-watch run`, and no secret is written into a manifest."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
MANIFESTS = sorted((REPO / "deploy" / "kubernetes").glob("*.yaml"))
K8S_VERSION = "1.37.0"


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_valid_against_kubernetes_schema(path: Path) -> None:
    kv = pytest.importorskip("kubernetes_validate")
    docs = _docs(path)
    assert docs
    for doc in docs:
        kv.validate(doc, K8S_VERSION, strict=True)  # raises ValidationError naming the field


def test_schema_check_catches_a_typo() -> None:
    """The check above can fail: a misspelt container field is refused."""
    kv = pytest.importorskip("kubernetes_validate")
    job = next(d for d in _docs(REPO / "deploy/kubernetes/ckpt-watch-job.yaml") if d["kind"] == "Job")
    job["spec"]["template"]["spec"]["containers"][0]["volumeMount"] = []
    with pytest.raises(kv.ValidationError, match="volumeMount"):
        kv.validate(job, K8S_VERSION, strict=True)


def _job_parts() -> tuple[dict, dict, dict]:
    docs = _docs(REPO / "deploy/kubernetes/ckpt-watch-job.yaml")
    config_map = next(d for d in docs if d["kind"] == "ConfigMap")
    job = next(d for d in docs if d["kind"] == "Job")
    (sidecar,) = [c for c in job["spec"]["template"]["spec"]["containers"] if c["name"] == "ckpt-watch"]
    return config_map, job, sidecar


def test_embedded_config_validates(tmp_path: Path) -> None:
    config_map, _, sidecar = _job_parts()
    (name, text), = config_map["data"].items()
    assert sidecar["command"][sidecar["command"].index("-c") + 1] == f"/etc/ckpt-watch/{name}"
    cfg = tmp_path / name
    cfg.write_text(text)
    r = subprocess.run([sys.executable, "-m", "ckpt_watch", "validate", str(cfg), "--no-engine-check",
                        "--no-judge-check"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    from ckpt_watch.config import load_config

    loaded = load_config(cfg)
    # results and checkpoints on the volume both containers mount
    _, job, _ = _job_parts()
    mounts = {m["mountPath"] for c in job["spec"]["template"]["spec"]["containers"] for m in c["volumeMounts"]
              if m["name"] == "checkpoints"}
    assert mounts == {"/checkpoints"}
    assert str(loaded.watch.dir).startswith("/checkpoints/") and str(loaded.results_dir).startswith("/checkpoints/")


def test_sidecar_command_is_a_real_run_command() -> None:
    """The sidecar's argv parses as `ckpt-watch run` (typer refuses an unknown option with exit 2)."""
    from typer.testing import CliRunner

    from ckpt_watch.cli import app

    _, _, sidecar = _job_parts()
    assert sidecar["command"][:2] == ["ckpt-watch", "run"] and "--exit-after-final" in sidecar["command"]
    r = CliRunner().invoke(app, [*sidecar["command"][1:], "--help"])
    assert r.exit_code == 0 and "--exit-after-final" in r.output
    bad = CliRunner().invoke(app, ["run", "-c", "x.yaml", "--exit-after-finall"])
    assert bad.exit_code == 2


def test_no_secret_in_manifests() -> None:
    _, job, sidecar = _job_parts()
    for var in sidecar["env"]:
        if "KEY" in var["name"] or "TOKEN" in var["name"] or "PASSWORD" in var["name"]:
            assert "value" not in var and "secretKeyRef" in var["valueFrom"], var
    grace = job["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    config_map, _, _ = _job_parts()
    drain = yaml.safe_load(next(iter(config_map["data"].values())))["daemon"]["drain_seconds"]
    assert grace >= drain + 30 + 30  # drain, MLflow flush, vLLM shutdown (as systemd's TimeoutStopSec)
