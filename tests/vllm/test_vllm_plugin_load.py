"""The plugin is found and loaded by vLLM's own plugin loader, and only acts on the vLLM releases in
``nvfp4_fuse.vllm.versions`` (0.33.x, 0.34.x)."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap
from importlib.metadata import entry_points

import pytest

import nvfp4_fuse.vllm as plugin_pkg


def test_entry_point_is_in_the_installed_metadata():
    eps = {ep.name: ep.value for ep in entry_points(group="vllm.general_plugins")}
    assert eps.get("nvfp4_fuse") == "nvfp4_fuse.vllm:register"


def test_load_general_plugins_registers_the_model_class(plugin, tmp_path, seed):
    import checkpoints
    import harness
    from vllm.model_executor.models.registry import _LazyRegisteredModel

    from nvfp4_fuse.vllm.deepseek_v4 import DeepseekV4ForCausalLM

    entry = plugin.models["DeepseekV4ForCausalLM"]
    assert isinstance(entry, _LazyRegisteredModel)
    assert (entry.module_name, entry.class_name) == ("nvfp4_fuse.vllm.deepseek_v4", "DeepseekV4ForCausalLM")
    # vLLM's registry resolves the architecture of a real checkpoint config to the plugin's class.
    cfg = harness.engine_config(checkpoints.write_source(tmp_path / "src", "nvidia", seed=seed))
    assert harness.model_class(cfg) is DeepseekV4ForCausalLM
    assert issubclass(DeepseekV4ForCausalLM, harness.STOCK)


def test_without_cuda_the_plugin_changes_nothing():
    """This host's platform is vLLM's CPU one, whose DeepSeek-V4 is not the NVIDIA model."""
    from vllm import ModelRegistry

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    log = logging.getLogger("vllm.plugins.nvfp4_fuse")
    log.addHandler(handler)
    try:
        before = dict(ModelRegistry.models)
        assert plugin_pkg.register() is False
        assert ModelRegistry.models == before
    finally:
        log.removeHandler(handler)
    assert [r.getMessage() for r in records if "changes nothing" in r.getMessage()]


@pytest.mark.parametrize(
    ("version", "ok"),
    [("0.33.0", True), ("0.33.2", True), ("0.33.1.dev12+g1234abc", True), ("0.34.0", True), ("0.34.3rc1", True),
     ("0.35.0", False), ("0.32.9", False), ("1.33.0", False), ("0.3.3", False), ("0.34", True), ("dev", False)],
)
def test_supported_versions(version, ok):
    assert plugin_pkg.supported(version) is ok


def test_other_vllm_version_logs_once_and_changes_nothing():
    """In a fresh interpreter (nothing of the plugin imported yet), vLLM's plugin loader runs the
    plugin as if vLLM were 0.35.0 and then 0.32.1, on a platform claiming CUDA: one warning line
    each, the registry untouched, the DeepSeek-V4 module never imported, vLLM's MegaMoE experts
    class not wrapped."""
    code = textwrap.dedent(
        """
        import logging, os, sys
        os.environ["VLLM_TARGET_DEVICE"] = "cpu"
        from unittest import mock
        import vllm.plugins
        from vllm import ModelRegistry
        from vllm.platforms import current_platform
        import nvfp4_fuse.vllm as p

        records = []
        class Keep(logging.Handler):
            def emit(self, r): records.append(r)
        logging.getLogger("vllm.plugins.nvfp4_fuse").addHandler(Keep())
        before = dict(ModelRegistry.models)
        for v in ("0.35.0", "0.32.1"):
            vllm.plugins.plugins_loaded = False
            with mock.patch.object(p, "vllm_version", lambda v=v: v), \\
                 mock.patch.object(type(current_platform), "is_cuda", lambda self: True):
                vllm.plugins.load_general_plugins()
        assert ModelRegistry.models == before
        assert "nvfp4_fuse.vllm.deepseek_v4" not in sys.modules
        import vllm.model_executor.layers.fused_moe.deep_gemm_mega_moe as dg
        assert not getattr(dg.DeepGemmMegaMoEExperts.__init__, "__nvfp4_fuse__", False)
        msgs = [r.getMessage() for r in records]
        assert len(msgs) == 2 and "vLLM 0.35.0 is not one this plugin was written against (0.33.x, 0.34.x)" in msgs[0] and "0.32.1" in msgs[1], msgs
        assert all(r.levelname == "WARNING" for r in records)
        print("ok")
        """
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout[-2000:] + r.stderr[-4000:]


def test_the_package_imports_without_vllm():
    """With vLLM made unimportable, the converter and the plugin package's vLLM-free parts import."""
    code = textwrap.dedent(
        """
        import sys
        sys.modules["vllm"] = None  # any `import vllm...` now raises ImportError
        import nvfp4_fuse.cli, nvfp4_fuse.convert, nvfp4_fuse.vllm, nvfp4_fuse.vllm.checkpoint
        import nvfp4_fuse.vllm.fused
        try:
            import nvfp4_fuse.vllm.deepseek_v4
        except ImportError:
            print("ok")
        """
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stdout + r.stderr[-3000:]


def test_the_installed_vllm_matches_its_entry_in_the_versions_table():
    from nvfp4_fuse.vllm.versions import RELEASES, mismatches, release_for

    release = release_for(plugin_pkg.vllm_version())
    assert release is not None and mismatches(release) == []
    # The other entries describe other code: each differs from the installed vLLM somewhere.
    for other in RELEASES.values():
        if other is not release:
            assert mismatches(other), other.name


def test_a_vllm_whose_code_differs_from_its_table_entry_is_refused_in_one_line(plugin, tmp_path, seed, monkeypatch):
    """A point release that moved what the plugin relies on (here: whether DeepseekV4ForCausalLM
    finalizes during load flips) fails when the model is built, naming the difference."""
    import dataclasses

    import checkpoints
    import harness

    from nvfp4_fuse.vllm import deepseek_v4, versions

    minor = versions.minor_of(plugin_pkg.vllm_version())
    flipped = dataclasses.replace(versions.RELEASES[minor], finalizes_during_load=not versions.RELEASES[minor].finalizes_during_load)
    monkeypatch.setitem(versions.RELEASES, minor, flipped)
    deepseek_v4.check_release.cache_clear()
    try:
        cfg = harness.engine_config(checkpoints.write_source(tmp_path / "src", "nvidia", seed=seed))
        with pytest.raises(RuntimeError) as exc:
            harness.build(cfg)
        msg = str(exc.value)
        assert msg.startswith("nvfp4-fuse: vLLM ") and "finalizes_weights_during_load" in msg and "\n" not in msg
    finally:
        monkeypatch.undo()
        deepseek_v4.check_release.cache_clear()
