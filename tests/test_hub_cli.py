"""The whole loop through the CLI against the loopback fake Hub: convert a repo id, verify, push."""

from __future__ import annotations

import json
import re

from helpers import load_all
from test_hub import fake_hub  # noqa: F401  (the loopback Hub fixture)
from typer.testing import CliRunner

from nvfp4_fuse.cli import app


def test_convert_verify_push_from_a_repo_id(make_ckpt, tmp_path, fake_hub, monkeypatch):  # noqa: F811
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    import huggingface_hub.constants as C

    monkeypatch.setattr(C, "HF_HUB_CACHE", str(tmp_path / "hf-home" / "hub"))
    src = make_ckpt(layers=2, experts=4, hidden=64, inter=32, unequal_scale_2=True)
    fake_hub.create("org/src", {p.name: p.read_bytes() for p in src.iterdir()})
    runner = CliRunner()

    r = runner.invoke(app, ["convert", "org/src", str(tmp_path / "dry"), "--dry-run", "--target", "vllm-fused"])
    assert r.exit_code == 0, (r.output, r.exception)
    assert "layers.1.ffn.experts" in r.output and "Hub's shard headers and configs" in r.output
    assert "no config.json" not in r.output  # the plan reads the configs: nothing to warn of
    assert not (tmp_path / "dry").exists()

    out = tmp_path / "out"
    r = runner.invoke(app, ["convert", "org/src", str(out), "--target", "vllm-fused"])
    assert r.exit_code == 0, (r.output, r.exception)
    assert load_all(out)["layers.1.ffn.experts.w13_weight"].shape == (4, 64, 32)

    r = runner.invoke(app, ["verify", "org/src", str(out), "--device", "cpu", "--json"])
    assert r.exit_code == 0, (r.output, r.exception)
    assert json.loads(r.output)["ok"]

    before = {p.name: p.read_bytes() for p in out.iterdir()}
    r = runner.invoke(app, ["push", str(out), "me/fused", "--base-model", "org/src"])
    assert r.exit_code == 0, (r.output, r.exception)
    remote = fake_hub.files("me/fused")
    for p in out.iterdir():
        if p.name not in ("README.md", "nvfp4-fuse-manifest.json"):  # the card, and the manifest listing it
            assert remote[p.name] == p.read_bytes(), p.name
    card = remote["README.md"].decode()
    assert "base_model: org/src" in card and "base_model_relation: quantized" in card
    assert "vllm-fused" in card and "Verification" in card
    # the folder is as it was, and still verifies
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    r = runner.invoke(app, ["verify", "org/src", str(out), "--device", "cpu"])
    assert r.exit_code == 0, (r.output, r.exception)
    # a second push of the same folder is a no-op that says so
    n = len(fake_hub.repos["me/fused"].commits)
    r = runner.invoke(app, ["push", str(out), "me/fused", "--base-model", "org/src"])
    assert r.exit_code == 0, (r.output, r.exception)
    assert "nothing pushed" in r.output and len(fake_hub.repos["me/fused"].commits) == n
    assert "Verification" in fake_hub.files("me/fused")["README.md"].decode()


def _converted(make_ckpt, tmp_path):
    src = make_ckpt(layers=2, experts=2, hidden=64, inter=32)
    out = tmp_path / "out"
    r = CliRunner().invoke(app, ["convert", str(src), str(out), "--target", "linear"])
    assert r.exit_code == 0, r.output
    return out


def test_push_token_option_is_used(make_ckpt, tmp_path, fake_hub, monkeypatch, capsys):  # noqa: F811
    from helpers import run_inprocess

    out = _converted(make_ckpt, tmp_path)
    monkeypatch.delenv("HF_TOKEN")
    code, _, stderr = run_inprocess(capsys, "push", str(out), "me/x", "--token", "wrong")
    assert code == 2 and "credentials" in stderr and "me/x" not in fake_hub.repos
    r = CliRunner().invoke(app, ["push", str(out), "me/x", "--token", fake_hub.token, "--private"])
    assert r.exit_code == 0, r.output
    assert fake_hub.repos["me/x"].private
    card = fake_hub.files("me/x")["README.md"].decode()
    # linear, of a model the vLLM plugin does not serve (it serves DeepSeek-V4 and V4.1)
    assert "library_name" not in card and "vllm serve" not in card


def test_a_hub_that_keeps_failing_is_exit_4_with_a_json_error(make_ckpt, tmp_path, fake_hub, monkeypatch, capsys):  # noqa: F811
    from helpers import run_inprocess

    from nvfp4_fuse.hub import retry as hub_retry

    out = _converted(make_ckpt, tmp_path)
    slept: list[float] = []
    monkeypatch.setattr(hub_retry, "_sleep", slept.append)
    fake_hub.fail_next("commit", *([503] * 10))
    code, stdout, _ = run_inprocess(capsys, "push", str(out), "me/x", "--json")
    assert code == 4 and len(slept) == 5
    body = json.loads(stdout)
    assert body["ok"] is False and body["error"]["code"] == 4 and body["error"]["kind"] == "hub_unavailable"


def test_a_hub_source_shows_its_downloads(make_ckpt, tmp_path, fake_hub, monkeypatch):  # noqa: F811
    """With a repo id as source, convert's and verify's progress carry a second line: the bytes this
    run downloaded, of those it had to (here every shard and sidecar: nothing in the HF cache)."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("NVFP4_FUSE_PROGRESS", "1")
    import huggingface_hub.constants as C

    monkeypatch.setattr(C, "HF_HUB_CACHE", str(tmp_path / "hf-home" / "hub"))
    src = make_ckpt(layers=2, experts=4, hidden=64, inter=32, shards=2)
    fake_hub.create("org/src", {p.name: p.read_bytes() for p in src.iterdir()})
    out = tmp_path / "out"
    runner = CliRunner()
    for args in (["convert", "org/src", str(out), "--target", "linear"], ["verify", "org/src", str(out), "--device", "cpu"]):
        r = runner.invoke(app, args)
        assert r.exit_code == 0, (r.output, r.exception)
        lines = [ln for ln in r.output.splitlines() if ln.lstrip(" ⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏").startswith("download")]
        assert lines, r.output
        m = re.search(r"download\s.*?([\d.]+)/([\d.]+) (bytes|kB|MB)", lines[-1])
        assert m and m[1] == m[2] and float(m[1]) > 0, lines[-1]  # e.g. "download ━━━━ 62.2/62.2 kB"
