"""The whole loop through the CLI against the loopback fake Hub: convert a repo id, verify, push."""

from __future__ import annotations

import json

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
    assert "layers.1.ffn.experts" in r.output and "Hub's shard headers alone" in r.output
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
