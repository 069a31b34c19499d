"""One prepared-set cache shared by processes: an entry appears whole or not at all, and one
that a process has loaded is never swapped under it by another process preparing the same
key at the same time."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from lora_ops.data import arrow_prepare
from lora_ops.data.arrow_prepare import PrepareSettings, prepare_cached
from lora_ops.data.arrow_store import load_arrow
from tests.unit.data.samples import valid_lines, write_lines

SETTINGS = PrepareSettings(max_seq_len=512, eval_fraction=0.2)
ROOT = Path(__file__).parents[3]

# One process of the race: it loads the tokenizer, says it is ready, waits for the word,
# prepares, and prints what it got as one JSON line.
PREPARE = """
import json, logging, sys, time
from pathlib import Path
from lora_ops import base_models
from lora_ops.data.arrow_prepare import PrepareSettings, prepare_cached
logging.basicConfig(level=logging.INFO, format="%(message)s")
data, cache, ready, go = map(Path, sys.argv[1:5])
tokenizer = base_models.load_tokenizer(base_models.resolve_base("tiny-llama"))
ready.touch()
while not go.exists():
    time.sleep(0.005)
done = prepare_cached(data, tokenizer, cache, PrepareSettings(max_seq_len=512, eval_fraction=0.2))
rows = [row.input_ids for row in done.train]
print(json.dumps({"folder": str(done.folder), "hit": done.cache_hit, "rows": rows}))
"""


def test_a_set_another_process_published_meanwhile_is_kept_and_used(
    tmp_path: Path, tiny_tokenizer: PreTrainedTokenizerBase
) -> None:
    path = write_lines(tmp_path, valid_lines(20))
    cache = tmp_path / "cache"
    work = tmp_path / "late"
    work.mkdir()
    # The late process read the file before the first one's entry was there.
    late = arrow_prepare.stage(path, tiny_tokenizer, SETTINGS, work)
    first = prepare_cached(path, tiny_tokenizer, cache, SETTINGS)
    rows = [row.input_ids for row in first.train]
    files = {item: item.stat().st_ino for item in first.folder.rglob("*")}

    arrow_prepare.build(late, tiny_tokenizer, SETTINGS, first.folder, replace=False)

    assert late.key == first.key
    assert {item: item.stat().st_ino for item in first.folder.rglob("*")} == files
    assert [row.input_ids for row in first.train] == rows  # its memory map still reads
    assert sorted(item.name for item in cache.iterdir()) == [first.folder.name]
    assert load_arrow(first.folder).key == first.key


def test_two_processes_preparing_one_file_at_once_share_one_entry(
    tmp_path: Path, tiny_base: Path
) -> None:
    path = write_lines(tmp_path, valid_lines(600))
    cache, go = tmp_path / "cache", tmp_path / "go"
    ready = [tmp_path / f"ready-{i}" for i in range(2)]
    racers = [
        subprocess.Popen(
            [sys.executable, "-c", PREPARE, str(path), str(cache), str(flag), str(go)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for flag in ready
    ]
    deadline = time.monotonic() + 240
    while not all(flag.exists() for flag in ready) and time.monotonic() < deadline:
        time.sleep(0.05)
    go.touch()  # both start preparing together
    outputs = [racer.communicate(timeout=240) for racer in racers]

    for racer, (_, stderr) in zip(racers, outputs, strict=True):
        assert racer.returncode == 0, stderr
    got = [json.loads(stdout.strip().splitlines()[-1]) for stdout, _ in outputs]
    assert got[0]["folder"] == got[1]["folder"]
    assert got[0]["rows"] == got[1]["rows"]
    assert sorted(str(item) for item in cache.iterdir()) == [got[0]["folder"]]
    # Either the second found the first's entry, or both tokenized and one used the other's.
    both_built = not got[0]["hit"] and not got[1]["hit"]
    used_theirs = sum("by another process meanwhile" in stderr for _, stderr in outputs)
    assert used_theirs == (1 if both_built else 0), [stderr for _, stderr in outputs]
    print(f"cache hits {[item['hit'] for item in got]}, kept the other's entry: {used_theirs}")
