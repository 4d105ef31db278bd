"""nvfp4_fuse.hub: push refusal/retry/verification with a recording fake api, the model card, and
end-to-end runs of huggingface_hub 2.4.0 against a loopback fake Hub (tests/fake_hub.py).

No test reaches beyond 127.0.0.1: an autouse guard refuses every other host name.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import sys
from pathlib import Path

import httpx2
import pytest
import torch
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError
from huggingface_hub.utils import SafetensorsFileMetadata, SafetensorsRepoMetadata, TensorInfo
from safetensors.torch import save

from nvfp4_fuse import hub
from nvfp4_fuse.errors import EXIT_BAD_INPUT, EXIT_CHECK_FAILED, InputError
from nvfp4_fuse.hub import PushFailed, PushVerificationFailed, push, render_model_card
from nvfp4_fuse.hub import retry as hub_retry
from nvfp4_fuse.hub import upload as hub_upload
from nvfp4_fuse.manifest import MANIFEST_NAME, Manifest
from nvfp4_fuse.safetensors_header import TensorInfo as TensorInfoLocal

sys.path.insert(0, str(Path(__file__).parent))
from fake_hub import FakeHub  # noqa: E402
from helpers import RecordingApi  # noqa: E402

SHARD1 = "model-00001-of-00002.safetensors"
SHARD2 = "model-00002-of-00002.safetensors"


# ------------------------------------------------------------------------------------------------
# fixtures and helpers
# ------------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch):
    real = socket.getaddrinfo

    def guarded(host, *a, **k):
        h = host.decode() if isinstance(host, bytes) else str(host)
        if h not in ("127.0.0.1", "localhost", "::1"):
            raise OSError(f"test tried to resolve {h!r}: only loopback is allowed")
        return real(host, *a, **k)

    monkeypatch.setattr(socket, "getaddrinfo", guarded)


@pytest.fixture
def sleeps(monkeypatch):
    rec: list[float] = []
    monkeypatch.setattr(hub_retry, "_sleep", rec.append)
    return rec


def make_folder(root: Path, files: dict[str, bytes] | None = None, *, manifest: bool = True) -> tuple[Path, Manifest]:
    root.mkdir(parents=True, exist_ok=True)
    files = files or {
        SHARD1: os.urandom(4096),
        SHARD2: os.urandom(1000),
        "model.safetensors.index.json": b'{"metadata": {}, "weight_map": {}}',
        "config.json": b'{"architectures": ["X"]}',
    }
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    m = Manifest(
        tool_version="0.1.0",
        layout="nvfp4-fuse/v2",
        target="mega-moe",
        options={"w13_order": "gate-up", "max_shard_size": "5GB"},
        input_fingerprint="f" * 64,
        files={n: {"size": len(d), "sha256": hashlib.sha256(d).hexdigest()} for n, d in files.items()},
        source={"repo_id": "nvidia/Some-MoE-FP4", "revision": "main"},
    )
    if manifest:
        (root / MANIFEST_NAME).write_text(json.dumps(m.to_json(), indent=1))
    return root, m


def simple_card(m: Manifest) -> str:
    return render_model_card(
        base_model="org/base", repo_id="me/x", manifest=m.to_json(), verify_summary=None, serve_hint=""
    )


def http_error(status: int, cls=HfHubHTTPError, headers=None) -> HfHubHTTPError:
    req = httpx2.Request("POST", "http://127.0.0.1:1/api/models/me/x/commit/main")
    resp = httpx2.Response(status, request=req, headers=headers or {})
    return cls(f"{status} error", response=resp)


# ------------------------------------------------------------------------------------------------
# push: refusal, force, retries, verification (recording fake)
# ------------------------------------------------------------------------------------------------


def test_refuses_folder_without_manifest(tmp_path):
    folder, _ = make_folder(tmp_path / "out", manifest=False)
    api = RecordingApi()
    with pytest.raises(InputError, match=MANIFEST_NAME) as ei:
        push(folder, "me/x", api=api)
    assert ei.value.exit_code == EXIT_BAD_INPUT
    assert api.calls == []


def test_refuses_tampered_file(tmp_path):
    folder, _ = make_folder(tmp_path / "out")
    data = bytearray((folder / SHARD2).read_bytes())
    data[10] ^= 1
    (folder / SHARD2).write_bytes(bytes(data))
    api = RecordingApi()
    with pytest.raises(InputError, match=f"{SHARD2}: sha256 differs"):
        push(folder, "me/x", api=api)
    assert api.calls == []


@pytest.mark.parametrize("case", ["no-manifest", "tampered"])
def test_force_pushes_anyway_and_checks_local_bytes(tmp_path, case):
    folder, _ = make_folder(tmp_path / "out", manifest=case != "no-manifest")
    if case == "tampered":
        (folder / SHARD1).write_bytes(b"changed after the manifest was written")
    api = RecordingApi()
    r = push(folder, "me/x", api=api, force=True)
    assert r.forced and r.notes
    assert api.names() == ["create_repo", "upload_folder", "get_paths_info"]
    assert r.checked[SHARD1] == "sha256" and r.checked["config.json"] == "git-sha1"


def test_clean_push_calls_and_result(tmp_path):
    folder, m = make_folder(tmp_path / "out")
    api = RecordingApi()
    r = push(folder, "me/x", api=api, private=True)
    assert not r.forced and r.attempts == 1 and not r.card_written
    create = api.calls[0][1]
    assert create == {"repo_id": "me/x", "private": True, "exist_ok": True, "repo_type": "model"}
    assert api.calls[1][0] == "get_paths_info"  # does the Hub hold these files already?
    up = api.calls[2][1]
    assert up["repo_id"] == "me/x" and up["repo_type"] == "model" and up["revision"] is None
    assert "mega-moe" in up["commit_message"] and "*.partial" in up["ignore_patterns"]
    assert set(r.uploaded) == set(m.files) | {MANIFEST_NAME}
    assert set(r.checked) == set(r.uploaded)


def test_partial_files_are_not_pushed(tmp_path):
    folder, m = make_folder(tmp_path / "out")
    (folder / (SHARD1 + ".partial")).write_bytes(b"half")
    (folder / ".cache" / "huggingface").mkdir(parents=True)
    (folder / ".cache" / "huggingface" / "x.lock").write_bytes(b"")
    r = push(folder, "me/x", api=RecordingApi())
    assert set(r.uploaded) == set(m.files) | {MANIFEST_NAME}  # everything else, and nothing more
    assert not any(p.endswith(".partial") or p.startswith(".cache") for p in r.uploaded)


def test_branch_created_only_for_a_named_revision(tmp_path):
    folder, _ = make_folder(tmp_path / "out")
    api = RecordingApi()
    push(folder, "me/x", api=api, revision="v1-mega")
    branch = {"repo_id": "me/x", "branch": "v1-mega", "exist_ok": True, "repo_type": "model"}
    assert api.calls[1] == ("create_branch", branch)
    assert api.calls[2][1]["revision"] == "v1-mega" and api.calls[3][1]["revision"] == "v1-mega"
    api2 = RecordingApi()
    push(folder, "me/x", api=api2, revision="main")
    assert "create_branch" not in api2.names()


def test_retry_survives_two_transient_errors(tmp_path, sleeps):
    folder, _ = make_folder(tmp_path / "out")
    api = RecordingApi([http_error(503), httpx2.ConnectError("connection reset"), None])
    r = push(folder, "me/x", api=api, backoff=2.0)
    assert r.attempts == 3
    assert api.names().count("upload_folder") == 3
    assert sleeps == [2.0, 4.0]
    assert r.commit_oid == "c" * 40


def test_transient_error_wrapped_by_the_library_is_retried(tmp_path, sleeps):
    # huggingface_hub wraps LFS upload failures: RuntimeError("Error while uploading ...") from the HTTP error
    folder, _ = make_folder(tmp_path / "out")
    try:
        raise RuntimeError("Error while uploading 'x' to the Hub.") from http_error(502)
    except RuntimeError as e:
        wrapped = e
    api = RecordingApi([wrapped, None])
    assert push(folder, "me/x", api=api, backoff=1.0).attempts == 2
    assert sleeps == [1.0]


def test_retry_after_is_honoured(tmp_path, sleeps):
    folder, _ = make_folder(tmp_path / "out")
    api = RecordingApi([http_error(429, headers={"Retry-After": "7"}), None])
    push(folder, "me/x", api=api, backoff=0.5)
    assert sleeps == [7.0]


def test_gives_up_after_retries(tmp_path, sleeps):
    folder, _ = make_folder(tmp_path / "out")
    api = RecordingApi([http_error(503)] * 10)
    with pytest.raises(PushFailed, match="failed after 3 attempts") as ei:
        push(folder, "me/x", api=api, retries=2, backoff=1.0)
    assert api.names().count("upload_folder") == 3
    assert sleeps == [1.0, 2.0]
    assert api.names().count("get_paths_info") == 1  # only the check before uploading
    assert "\n" not in str(ei.value)


def test_create_repo_is_retried_too(tmp_path, sleeps):
    folder, _ = make_folder(tmp_path / "out")
    api = RecordingApi(create_outcomes=[httpx2.ReadTimeout("slow")])
    push(folder, "me/x", api=api, backoff=1.0)
    assert api.names()[:2] == ["create_repo", "create_repo"]


@pytest.mark.parametrize(
    "err, words",
    [
        (http_error(401), "credentials"),
        (http_error(403), "no write access"),
        (http_error(404, RepositoryNotFoundError), "not found"),
        (http_error(413), "refused"),
    ],
)
def test_client_errors_are_not_retried(tmp_path, sleeps, err, words):
    folder, _ = make_folder(tmp_path / "out")
    api = RecordingApi([err, None])
    with pytest.raises(InputError, match=words) as ei:
        push(folder, "me/x", api=api)
    assert api.names().count("upload_folder") == 1
    assert sleeps == []
    assert "\n" not in str(ei.value)


def test_auth_error_on_create_repo_is_input_error(tmp_path, sleeps):
    folder, _ = make_folder(tmp_path / "out")
    api = RecordingApi(create_outcomes=[http_error(401)])
    with pytest.raises(InputError, match="HF_TOKEN"):
        push(folder, "me/x", api=api)
    assert api.names() == ["create_repo"]


@pytest.mark.parametrize("what", ["lfs", "regular", "missing"])
def test_mismatch_after_upload_is_detected(tmp_path, what):
    folder, _ = make_folder(tmp_path / "out")
    api = RecordingApi()
    if what == "lfs":
        good = (folder / SHARD1).read_bytes()
        api.tamper[SHARD1] = bytes([good[0] ^ 1]) + good[1:]
    elif what == "regular":
        api.tamper["config.json"] = b'{"architectures": ["Y"]}'
    else:
        api.drop.add(SHARD2)
    with pytest.raises(PushVerificationFailed) as ei:
        push(folder, "me/x", api=api)
    assert ei.value.exit_code == EXIT_CHECK_FAILED
    name = {"lfs": SHARD1, "regular": "config.json", "missing": SHARD2}[what]
    assert ei.value.problems and ei.value.problems[0].startswith(name)


def test_lfs_files_are_checked_against_the_manifest_without_rereading(tmp_path, monkeypatch):
    folder, _ = make_folder(tmp_path / "out")
    api = RecordingApi()
    read: list[str] = []
    real = hub_upload.sha256_file
    monkeypatch.setattr(hub_upload, "sha256_file", lambda p: read.append(Path(p).name) or real(p))
    push(folder, "me/x", api=api)
    assert read == []  # check_files hashes via manifest.sha256_file, not hub's; hub re-reads no shard


def test_card_goes_to_the_hub_and_the_folder_is_left_as_it_was(tmp_path):
    folder, m = make_folder(tmp_path / "out")
    (folder / "README.md").write_text("user's own readme\n")
    api = RecordingApi()
    push(folder, "me/x", api=api)
    assert api.remote["README.md"] == b"user's own readme\n"
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    card = simple_card(m)
    api = RecordingApi()
    r = push(folder, "me/x", api=api, card=card)
    assert r.card_written and api.remote["README.md"] == card.encode()
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # nothing local changed
    pushed = json.loads(api.remote[MANIFEST_NAME])  # the Hub's manifest lists the card it got
    assert pushed["files"]["README.md"]["sha256"] == hashlib.sha256(card.encode()).hexdigest()
    assert pushed["model_card"] == pushed["files"]["README.md"]["sha256"]


def test_bad_arguments(tmp_path):
    folder, _ = make_folder(tmp_path / "out")
    with pytest.raises(InputError, match="repo id"):
        push(folder, "not a repo", api=RecordingApi())
    with pytest.raises(InputError, match="not a folder"):
        push(tmp_path / "nope", "me/x", api=RecordingApi())


# ------------------------------------------------------------------------------------------------
# model card
# ------------------------------------------------------------------------------------------------


def front_matter(text: str) -> dict:
    import yaml  # a dependency of huggingface_hub itself

    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_model_card_front_matter_and_sections(tmp_path):
    _, m = make_folder(tmp_path / "out")
    summary = {
        "status": "ok",
        "tensors_checked": 384,
        "layers": [
            {"layer": 1, "experts": 256, "max_abs_err": 0.0, "result": "bit-exact"},
            {"layer": 2, "experts": 256, "max_abs_err": 0.0, "result": "bit-exact"},
        ],
    }
    card = render_model_card(
        base_model="nvidia/Some-MoE-FP4",
        repo_id="me/Some-MoE-FP4-mega",
        manifest=m.to_json(),
        verify_summary=summary,
        serve_hint=hub.default_serve_hint("mega-moe", "me/Some-MoE-FP4-mega"),
    )
    fm = front_matter(card)
    assert fm == {
        "base_model": "nvidia/Some-MoE-FP4",
        "base_model_relation": "quantized",
        "library_name": "transformers",
        "tags": ["nvfp4", "modelopt", "fused-moe"],
    }
    for heading in ("## What this is", "## Layout", "## Verification", "## How to serve", "## How it was produced"):
        assert heading in card
    assert "vllm serve me/Some-MoE-FP4-mega --moe-backend deep_gemm_mega_moe" in card
    assert "| `w13_order` | `gate-up` |" in card
    assert "`nvfp4-fuse/v2`" in card and "`mega-moe`" in card
    assert "| layer | experts | max_abs_err | result |" in card and "| 2 | 256 | 0 | bit-exact |" in card
    assert "nvfp4-fuse convert nvidia/Some-MoE-FP4" in card and "nvfp4-fuse 0.1.0" in card

    # huggingface_hub parses the same metadata
    from huggingface_hub import ModelCard

    data = ModelCard(card).data
    assert data.base_model == "nvidia/Some-MoE-FP4" and data.library_name == "transformers"
    assert data.to_dict()["base_model_relation"] == "quantized"


def test_model_card_without_base_model_or_summary(tmp_path):
    _, m = make_folder(tmp_path / "out")
    d = m.to_json()
    d["target"] = "vllm-fused"
    d["source"]["architectures"] = ["Qwen3MoeForCausalLM"]
    card = render_model_card(base_model=None, repo_id="me/x", manifest=d, verify_summary=None, serve_hint="")
    fm = front_matter(card)
    assert "base_model" not in fm and "base_model_relation" not in fm
    assert fm["tags"] == ["nvfp4", "modelopt", "fused-moe"]
    assert "## Verification" not in card
    # no loader reads fused experts of this model: the card claims no library, suggests no `vllm serve`
    assert "library_name" not in fm and "vllm serve" not in card and "hf download me/x" in card
    # DeepSeek-V4.1: the plugin serves any target, on any NVFP4 MoE backend
    d["source"]["architectures"] = ["DeepseekV41ForCausalLM"]
    card = render_model_card(base_model=None, repo_id="me/x", manifest=d, verify_summary=None, serve_hint="")
    assert front_matter(card)["library_name"] == "transformers"
    assert "pip install 'nvfp4-fuse[vllm]'" in card and "vllm serve me/x --moe-backend flashinfer_cutedsl" in card
    # per-expert output: any engine serves it as it is, whatever the model
    d["target"], d["source"]["architectures"] = "per-expert", ["Qwen3MoeForCausalLM"]
    card = render_model_card(base_model=None, repo_id="me/x", manifest=d, verify_summary=None, serve_hint="")
    assert front_matter(card)["library_name"] == "transformers" and "vllm serve me/x" in card and "nvfp4-fuse[vllm]" not in card


def test_model_card_quotes_odd_yaml_values(tmp_path):
    _, m = make_folder(tmp_path / "out")
    card = render_model_card(
        base_model="yes", repo_id="me/x", manifest=m.to_json(), verify_summary=None, serve_hint="x"
    )
    assert front_matter(card)["base_model"] == "yes"


# ------------------------------------------------------------------------------------------------
# end to end against the loopback fake Hub
# ------------------------------------------------------------------------------------------------


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    import huggingface_hub.constants as C
    from huggingface_hub.utils import _detect_agent, disable_progress_bars, enable_progress_bars

    # huggingface_hub reads HF_* variables at import: set the env *and* the constants it derived.
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setattr(C, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(C, "HF_HUB_OFFLINE", False)
    # 2.4.0 fetches {ENDPOINT}/api/agent-harnesses when it first builds headers: keep it local
    monkeypatch.setattr(_detect_agent, "_registry", _detect_agent._EMPTY_REGISTRY)
    monkeypatch.setattr(C, "AGENT_HARNESSES_PATH", str(tmp_path / "agent-harnesses.json"))
    with FakeHub() as fh:
        # module-level helpers (snapshot_download, hf_hub_url) use these, not HfApi(endpoint=...)
        monkeypatch.setattr(C, "ENDPOINT", fh.endpoint)
        monkeypatch.setattr(C, "HUGGINGFACE_CO_URL_TEMPLATE", fh.endpoint + "/{repo_id}/resolve/{revision}/{filename}")
        monkeypatch.setenv("HF_TOKEN", fh.token)
        disable_progress_bars()
        try:
            yield fh
        finally:
            enable_progress_bars()


def api_for(fh: FakeHub, token: str | None = None):
    from huggingface_hub import HfApi

    return HfApi(endpoint=fh.endpoint, token=token or fh.token)


def test_e2e_push_survives_a_503_on_commit(tmp_path, fake_hub):
    folder, m = make_folder(tmp_path / "out")
    card = simple_card(m)
    fake_hub.fail_next("commit", 503)
    r = push(folder, "me/x", api=api_for(fake_hub), card=card, backoff=0.0)

    assert fake_hub.calls("commit") == [503, 200]
    assert r.attempts == 2
    assert r.commit_oid == fake_hub.repos["me/x"].branches["main"]
    remote = fake_hub.files("me/x")
    for rel in r.uploaded:
        if rel not in ("README.md", MANIFEST_NAME):  # the card, and the manifest that lists it
            assert remote[rel] == (folder / rel).read_bytes(), rel
    assert not (folder / "README.md").exists()
    # shards went through LFS (checked by sha256), small files inline (checked by git blob sha1)
    assert fake_hub.calls("lfs-upload") == [200, 200]
    assert r.checked[SHARD1] == r.checked[SHARD2] == "sha256"
    assert r.checked["config.json"] == r.checked["README.md"] == r.checked[MANIFEST_NAME] == "git-sha1"
    assert remote["README.md"].decode() == card
    assert fake_hub.calls("paths-info") == [200, 200]  # before (nothing there yet) and after


@pytest.mark.parametrize("path", [SHARD1, "config.json"])
def test_e2e_corruption_on_the_hub_is_detected(tmp_path, fake_hub, path):
    folder, _ = make_folder(tmp_path / "out")
    fake_hub.corrupt_paths.add(path)
    with pytest.raises(PushVerificationFailed) as ei:
        push(folder, "me/x", api=api_for(fake_hub), backoff=0.0)
    assert [p for p in ei.value.problems if p.startswith(path)]
    assert len(ei.value.problems) == 1


def test_e2e_second_push_is_a_no_op_and_to_a_branch(tmp_path, fake_hub):
    folder, _ = make_folder(tmp_path / "out")
    api = api_for(fake_hub)
    first = push(folder, "me/x", api=api, backoff=0.0)
    n_commits = len(fake_hub.repos["me/x"].commits)
    again = push(folder, "me/x", api=api, backoff=0.0)  # create_repo -> 409 (exists), nothing changed
    assert fake_hub.calls("create") == [200, 409]
    assert len(fake_hub.repos["me/x"].commits) == n_commits
    assert again.up_to_date and not first.up_to_date and again.uploaded == []
    r = push(folder, "me/x", api=api, revision="v2", backoff=0.0)
    assert set(fake_hub.files("me/x", "v2")) >= set(r.uploaded)


def test_e2e_bad_token_is_an_input_error_not_retried(tmp_path, fake_hub, sleeps):
    folder, _ = make_folder(tmp_path / "out")
    with pytest.raises(InputError, match="credentials"):
        push(folder, "me/x", api=api_for(fake_hub, token="wrong"))
    assert fake_hub.calls("create") == [401] and sleeps == []


def test_e2e_resolve_source_downloads_and_maps_errors(tmp_path, fake_hub, monkeypatch):
    import huggingface_hub.constants as C

    fake_hub.create("org/src", {"config.json": b"{}", SHARD1: b"\0" * 64})
    p = hub.resolve_source("org/src", cache_dir=str(tmp_path / "cache"))
    assert (p / "config.json").read_bytes() == b"{}" and (p / SHARD1).stat().st_size == 64

    with pytest.raises(InputError, match="org/missing not found"):
        hub.resolve_source("org/missing", cache_dir=str(tmp_path / "cache"))
    with pytest.raises(InputError, match="revision 'nope' not found"):
        hub.resolve_source("org/src", revision="nope", cache_dir=str(tmp_path / "cache"))

    monkeypatch.setattr(C, "HF_HUB_OFFLINE", True)
    assert hub.resolve_source("org/src", cache_dir=str(tmp_path / "cache")) == p  # cached: fine offline
    with pytest.raises(InputError, match="HF_HUB_OFFLINE"):
        hub.resolve_source("org/other", cache_dir=str(tmp_path / "cache"))


def test_resolve_source_local_and_bad_ids(tmp_path):
    assert hub.resolve_source(str(tmp_path)) == tmp_path
    f = tmp_path / "file.bin"
    f.write_bytes(b"x")
    with pytest.raises(InputError, match="is a file"):
        hub.resolve_source(str(f))
    for bad in ("./missing/dir", "/abs/missing", "a/b/c", "not an id", "org/na me"):
        with pytest.raises(InputError, match="neither an existing folder nor a Hub repo id"):
            hub.resolve_source(bad)


def test_e2e_remote_headers_by_range_requests(fake_hub):
    a = save({"x.weight": torch.zeros(4, 8, dtype=torch.uint8), "x.scale": torch.ones(2)}, metadata={"format": "pt"})
    b = save({"y.weight": torch.zeros(3, dtype=torch.float16)})
    wm = {"x.weight": SHARD1, "x.scale": SHARD1, "y.weight": SHARD2}
    index = json.dumps({"metadata": {"total_size": 46}, "weight_map": wm}).encode()
    fake_hub.create("org/src", {SHARD1: a + os.urandom(200_000), SHARD2: b, "model.safetensors.index.json": index})

    out = hub.remote_safetensors_headers("org/src", api=api_for(fake_hub))
    assert out.sharded is True and out.weight_map == wm and out.index_metadata == {"total_size": 46}
    h1 = out.headers[SHARD1]  # the same header type as a local read gives
    assert h1.metadata == {"format": "pt"}
    assert h1.tensors["x.weight"] == TensorInfoLocal("x.weight", "U8", (4, 8), 8, 40)
    assert out.headers[SHARD2].tensors == {"y.weight": TensorInfoLocal("y.weight", "F16", (3,), 0, 6)}
    # only headers were fetched: every GET of a shard was a ranged one (206)
    shard_gets = [
        s for m, n, path, s in fake_hub.log if m == "GET" and n == "resolve" and path.endswith(".safetensors")
    ]
    assert shard_gets and set(shard_gets) == {206}

    with pytest.raises(InputError, match="no model.safetensors"):
        hub.remote_safetensors_headers("org/missing", api=api_for(fake_hub))


def test_remote_headers_reject_unsafe_shard_names():
    class Api:
        def get_safetensors_metadata(self, repo_id, revision=None):
            fm = SafetensorsFileMetadata(metadata={}, tensors={"t": TensorInfo("U8", [1], (0, 1))})
            return SafetensorsRepoMetadata(
                metadata=None,
                sharded=True,
                weight_map={"t": "../evil.safetensors"},
                files_metadata={"../evil.safetensors": fm},
            )

    with pytest.raises(InputError, match="unsafe shard file name"):
        hub.remote_safetensors_headers("org/x", api=Api())
