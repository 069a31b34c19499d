"""Tests for lora_ops.storage.config: what a Storage is built from, and where the keys go."""

from __future__ import annotations

from lora_ops.settings import Settings
from lora_ops.storage import PART_SIZE, Storage, StorageConfig

KEY, SECRET = "config-test-key", "config-test-secret-5678"


def test_the_keys_reach_the_client_and_nothing_else() -> None:
    config = StorageConfig("http://127.0.0.1:1", KEY, SECRET, attempts=0)
    storage = Storage(config)  # builds a client; contacts nothing

    assert KEY not in repr(config)
    assert SECRET not in repr(config)
    for text in (repr(storage), repr(vars(storage))):
        assert SECRET not in text
    assert storage.client._request_signer._credentials.secret_key == SECRET
    assert storage.attempts == 1  # at least one try, whatever was asked


def test_storage_from_settings_takes_the_endpoint_keys_and_options() -> None:
    settings = Settings.model_validate(  # by the variables' names: they win over the environment
        {
            "LORA_OPS_S3_ENDPOINT_URL": "http://127.0.0.1:2",
            "AWS_ACCESS_KEY_ID": KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET,
            "AWS_DEFAULT_REGION": "eu-west-1",
        }
    )

    config = StorageConfig.from_settings(settings, read_timeout_s=3.0)
    storage = Storage.from_settings(settings, multipart_threshold=PART_SIZE * 2)

    assert (config.endpoint_url, config.access_key, config.secret_key) == (
        "http://127.0.0.1:2",
        KEY,
        SECRET,
    )
    assert (config.region, config.read_timeout_s, config.attempts) == ("eu-west-1", 3.0, 4)
    assert (storage.endpoint_url, storage.region) == ("http://127.0.0.1:2", "eu-west-1")
    assert storage.transfer.multipart_threshold == PART_SIZE * 2
    assert storage.transfer.multipart_chunksize == PART_SIZE * 2
