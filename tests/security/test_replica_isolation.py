"""Tenant isolation on a real replica process, over HTTP: who may load, who may ask which
adapter, where adapters may come from, and that what is served is what was loaded.

The replica keeps one adapter resident (``--max-adapters 1``), so asking another customer's
adapter evicts the last one and the next request for it is a reload from disk.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from lora_ops.files import sha256_file
from tests.serving.replicas import TOKEN, Replica, make_adapters

pytestmark = pytest.mark.integration
ACME_KEY = "acme-key-for-isolation-0123456789"
GLOBEX_KEY = "globex-key-for-isolation-0123456789"
WEIGHTS = "adapter_model.safetensors"


class WritesMarker:
    """A pickle payload: unpickling it opens (so creates) ``path`` for writing."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (str(self.path), "w"))


@pytest.fixture(scope="module")
def roots(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two adapter roots, and a folder outside both."""
    made = make_adapters(tiny_base, tmp_path_factory.mktemp("made"), ["acme", "globex", "initech"])
    base = tmp_path_factory.mktemp("isolation")
    folders = {"root": base / "root", "second": base / "second", "outside": base / "outside"}
    for name in ("acme", "globex", "initech"):
        shutil.copytree(made[name], folders["root"] / name)
    shutil.copytree(made["initech"], folders["second"] / "initech")
    shutil.copytree(made["acme"], folders["outside"] / "acme")
    return folders


@pytest.fixture(scope="module")
def replica(
    tiny_base: Path, roots: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Replica]:
    state = tmp_path_factory.mktemp("replica")
    keys = state / "keys.json"
    grants = {
        ACME_KEY: {"customer": "acme"},
        GLOBEX_KEY: {"customer": "globex", "allow_base": True},
    }
    keys.write_text(json.dumps(grants))
    args = [
        *("--adapter-root", str(roots["root"]), "--adapter-root", str(roots["second"])),
        *("--api-keys", str(keys), "--max-adapters", "1"),
    ]
    with Replica(tiny_base, state / "replica.log", args) as running:
        for name in ("acme", "globex"):
            folder = roots["root"] / name
            loaded = running.load(name, folder, sha256_file(folder / WEIGHTS))
            assert loaded.status_code == 200, loaded.text
        yield running


def ask(replica: Replica, model: str, key: str | None = TOKEN) -> httpx.Response:
    return replica.complete(model, key=key)


def error_of(response: httpx.Response) -> str:
    return str(response.json()["error"]["message"])


@pytest.mark.parametrize(
    ("path", "token", "status"),
    [
        ("/v1/load_lora_adapter", None, 401),
        ("/v1/load_lora_adapter", "not-the-admin-token", 403),
        ("/v1/load_lora_adapter", ACME_KEY, 403),
        ("/v1/unload_lora_adapter", None, 401),
        ("/v1/unload_lora_adapter", "not-the-admin-token", 403),
        ("/v1/unload_lora_adapter", GLOBEX_KEY, 403),
    ],
    ids=[
        "load-none",
        "load-wrong",
        "load-customer-key",
        "unload-none",
        "unload-wrong",
        "unload-key",
    ],
)
def test_admin_routes_need_the_admin_token(
    replica: Replica, roots: dict[str, Path], path: str, token: str | None, status: int
) -> None:
    body = {"lora_name": "acme", "lora_path": str(roots["root"] / "globex")}
    assert replica.post(path, body, token=token).status_code == status
    assert ask(replica, "acme").status_code == 200  # still there, still acme's


@pytest.mark.parametrize(
    ("model", "key", "status"),
    [
        ("acme", ACME_KEY, 200),
        ("globex", ACME_KEY, 403),
        ("base", ACME_KEY, 403),
        ("acme", GLOBEX_KEY, 403),
        ("base", GLOBEX_KEY, 200),
        ("acme", None, 401),
        ("acme", "a-key-nobody-was-given-000", 401),
    ],
    ids=["own", "other", "base-not-granted", "other-way", "base-granted", "no-key", "unknown"],
)
def test_customer_keys_reach_only_their_own_adapter(
    replica: Replica, model: str, key: str | None, status: int
) -> None:
    assert ask(replica, model, key).status_code == status


def test_customer_keys_see_only_their_own_models(replica: Replica) -> None:
    def cards(key: str) -> list[dict[str, str]]:
        headers = {"Authorization": f"Bearer {key}"}
        response = httpx.get(replica.url + "/v1/models", headers=headers, timeout=30)
        return list(response.json()["data"])

    def listed(key: str) -> list[str]:
        return [model["id"] for model in cards(key)]

    assert listed(ACME_KEY) == ["acme"]
    assert cards(ACME_KEY)[0]["root"] == "acme"  # not the folder it was loaded from
    assert listed(GLOBEX_KEY) == ["base", "globex"]
    assert listed(TOKEN) == ["base", "acme", "globex"]


def test_adapter_paths_cannot_escape_the_roots(replica: Replica, roots: dict[str, Path]) -> None:
    root, outside = roots["root"], roots["outside"]
    (root / "escape").symlink_to(outside / "acme", target_is_directory=True)
    (root / "half").mkdir()
    shutil.copy(outside / "acme" / "adapter_config.json", root / "half")
    (root / "half" / WEIGHTS).symlink_to(outside / "acme" / WEIGHTS)
    refused = {
        str(outside / "acme"): "outside the adapter roots",
        str(root / ".." / "outside" / "acme"): "outside the adapter roots",
        str(root / "escape"): "outside the adapter roots",
        str(root / "half"): "outside the adapter roots",
        "/etc": "outside the adapter roots",
        "s3://someone-elses-bucket/adapters/acme": "only the bucket",
        "models:/adapter-globex/1": "belongs to customer 'globex'",
        "models:/adapter-globex@production": "cannot be served as 'acme'",
    }
    for path, reason in refused.items():
        response = replica.load("acme", path)
        assert response.status_code == 400, (path, response.text)
        assert reason in error_of(response)
        assert path in error_of(response) or path.startswith("/etc")
    assert replica.load("initech", roots["second"] / "initech").status_code == 200  # 2nd root
    assert ask(replica, "initech").status_code == 200


def test_pickles_are_never_unpickled(replica: Replica, roots: dict[str, Path]) -> None:
    marker = roots["outside"] / "unpickled"
    control = roots["outside"] / "control"
    pickle.loads(pickle.dumps(WritesMarker(control)))  # the payload works when unpickled
    assert control.exists()
    folder = roots["root"] / "pickled"
    folder.mkdir()
    shutil.copy(roots["root"] / "acme" / "adapter_config.json", folder)
    for name in ("adapter_model.bin", "adapter_model.pt"):
        (folder / name).write_bytes(pickle.dumps(WritesMarker(marker)))
    response = replica.load("hooli", folder)
    assert response.status_code == 400
    assert "pickle file and is never loaded" in error_of(response)
    assert not marker.exists()
    assert replica.post("/v1/unload_lora_adapter", {"lora_name": "hooli"}).status_code == 404


def test_a_wrong_sha256_is_refused_and_the_old_adapter_serves_on(
    replica: Replica, roots: dict[str, Path]
) -> None:
    before = ask(replica, "acme").json()["choices"][0]["text"]
    wrong = sha256_file(roots["root"] / "acme" / WEIGHTS)  # acme's sha, globex's files
    response = replica.load("acme", roots["root"] / "globex", wrong)
    assert response.status_code == 400
    assert "does not match the sha256" in error_of(response)
    assert ask(replica, "acme").json()["choices"][0]["text"] == before


def test_weights_changed_on_disk_are_not_served_after_an_eviction(
    replica: Replica, roots: dict[str, Path]
) -> None:
    folder = roots["root"] / "initech"
    good = (folder / WEIGHTS).read_bytes()
    assert replica.load("initech", folder, sha256_file(folder / WEIGHTS)).status_code == 200
    before = ask(replica, "initech").json()["choices"][0]["text"]
    assert ask(replica, "globex").status_code == 200  # the cache holds one: initech leaves
    shutil.copy(roots["root"] / "acme" / WEIGHTS, folder / WEIGHTS)
    try:
        refused = ask(replica, "initech")
        assert refused.status_code == 503, refused.text
        assert "'initech' cannot be served right now" in error_of(refused)
        assert str(folder) not in refused.text  # no server paths for the caller
        assert ask(replica, "globex").status_code == 200  # the others serve on
    finally:
        (folder / WEIGHTS).write_bytes(good)
    assert ask(replica, "initech").json()["choices"][0]["text"] == before


def test_the_adapter_roots_setting_confines_like_the_option(
    tiny_base: Path, roots: dict[str, Path], tmp_path: Path
) -> None:
    env = {"LORA_OPS_ADAPTER_ROOTS": os.pathsep.join([str(roots["second"]), "/nonexistent"])}
    with pytest.raises(AssertionError, match="nonexistent is not a folder"):
        Replica(tiny_base, tmp_path / "typo.log", [], env).__enter__()
    env = {"LORA_OPS_ADAPTER_ROOTS": str(roots["second"])}
    with Replica(tiny_base, tmp_path / "replica.log", [], env) as replica:
        assert replica.load("initech", roots["second"] / "initech").status_code == 200
        refused = replica.load("acme", roots["root"] / "acme")
        assert refused.status_code == 400
        assert "outside the adapter roots" in error_of(refused)
