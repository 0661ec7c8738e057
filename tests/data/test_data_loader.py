import json
import warnings

import numpy as np
import pytest
import torch

from dsmoe.data.errors import DataError
from dsmoe.data.loader import TokenLoader
from dsmoe.data.shards import prepare


def write_shards(folder, sizes, vocab=1000, val_sizes=(50,)):
    """Shards holding 0, 1, 2, ... (mod vocab) across files, so every token tells where it came from."""
    folder.mkdir()
    entries, start = {"train": [], "val": []}, 0
    for split, split_sizes in (("train", sizes), ("val", val_sizes)):
        for i, n in enumerate(split_sizes):
            name = f"{split}-{i:05d}.bin"
            (np.arange(start, start + n) % vocab).astype(np.uint16).tofile(folder / name)
            entries[split].append({"file": name, "tokens": n})
            start += n
    index = {
        "format": 1,
        "dtype": "uint16",
        "vocab_size": vocab,
        "eos_id": 0,
        "shards": entries,
        "tokens": {k: sum(e["tokens"] for e in v) for k, v in entries.items()},
    }
    (folder / "index.json").write_text(json.dumps(index))
    return folder


def _windows(x):
    return {int(row[0]) for row in x}


def test_batches_are_shifted_windows_across_shard_boundaries(tmp_path):
    data = write_shards(tmp_path / "d", [37, 50, 13])  # 100 tokens; windows of 9 tokens straddle files
    loader = TokenLoader(data, "train", batch_size=2, seq_len=8)
    assert loader.windows_per_epoch == 12 and loader.batches_per_epoch == 6
    seen = set()
    for _ in range(loader.batches_per_epoch):
        x, y = next(loader)
        assert x.shape == y.shape == (2, 8) and x.dtype == y.dtype == torch.int64
        assert torch.equal(y[:, :-1], x[:, 1:])
        assert all(torch.equal(row, torch.arange(row[0], row[0] + 8)) for row in x)  # contiguous across files
        assert all(int(row[0]) % 8 == 0 for row in x)  # non-overlapping starts
        seen |= _windows(x)
    assert seen == {8 * i for i in range(12)}  # an epoch visits every window once


def test_epochs_reshuffle_and_seeds_differ(tmp_path):
    data = write_shards(tmp_path / "d", [400])
    loader = TokenLoader(data, "train", batch_size=3, seq_len=7)  # 57 windows: 19 full batches
    first = [next(loader)[0] for _ in range(loader.batches_per_epoch)]
    second = [next(loader)[0] for _ in range(loader.batches_per_epoch)]
    assert loader.epoch == 1
    assert [_windows(b) for b in first] != [_windows(b) for b in second]
    assert set().union(*map(_windows, first)) == set().union(*map(_windows, second))
    other = TokenLoader(data, "train", batch_size=3, seq_len=7, seed=1)
    assert not torch.equal(next(other)[0], first[0])
    again = TokenLoader(data, "train", batch_size=3, seq_len=7)
    assert torch.equal(next(again)[0], first[0])


def test_ranks_split_the_global_batch(tmp_path):
    data = write_shards(tmp_path / "d", [1000])
    whole = TokenLoader(data, "train", batch_size=6, seq_len=10, seed=3)
    ranks = [
        TokenLoader(data, "train", batch_size=3, seq_len=10, seed=3, rank=r, world_size=2) for r in (0, 1)
    ]
    for _ in range(whole.batches_per_epoch + 2):  # into the second epoch too
        x, y = next(whole)
        parts = [next(r) for r in ranks]
        assert torch.equal(torch.cat([p[0] for p in parts]), x)
        assert torch.equal(torch.cat([p[1] for p in parts]), y)


def test_resume_continues_exactly(tmp_path):
    data = write_shards(tmp_path / "d", [300])
    loader = TokenLoader(data, "train", batch_size=2, seq_len=5)
    for _ in range(loader.batches_per_epoch + 3):
        next(loader)
    state = loader.state_dict()
    expected = [next(loader) for _ in range(5)]
    resumed = TokenLoader(data, "train", batch_size=2, seq_len=5)
    resumed.load_state_dict(json.loads(json.dumps(state)))  # survives a round trip through JSON
    for want in expected:
        got = next(resumed)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    with pytest.raises(
        DataError, match="6 windows into epoch 1, not a whole number of this loader's global batc"
    ):
        TokenLoader(data, "train", batch_size=4, seq_len=5).load_state_dict(state)
    with pytest.raises(DataError, match="seq_len=5 but this loader has 6"):
        TokenLoader(data, "train", batch_size=2, seq_len=6).load_state_dict(state)


def test_resume_on_another_number_of_ranks_continues_at_the_same_window(tmp_path):
    """Saved by 2 ranks of 4 windows each, resumed by 1 rank that takes two micro-batches of 4 per step (and the
    reverse): the windows of every later step are the same."""
    data = write_shards(tmp_path / "d", [1000])
    two = [TokenLoader(data, "train", batch_size=4, seq_len=10, rank=r, world_size=2) for r in (0, 1)]
    for _ in range(3):
        for r in two:
            next(r)
    one = TokenLoader(data, "train", batch_size=4, seq_len=10)
    one.load_state_dict(json.loads(json.dumps(two[0].state_dict())))
    assert one.position == 6
    for _ in range(4):
        assert torch.equal(torch.cat([next(r)[0] for r in two]), torch.cat([next(one)[0], next(one)[0]]))
    back = [TokenLoader(data, "train", batch_size=4, seq_len=10, rank=r, world_size=2) for r in (0, 1)]
    for r in back:
        r.load_state_dict(one.state_dict())
    assert torch.equal(torch.cat([next(r)[0] for r in back]), torch.cat([next(one)[0], next(one)[0]]))


def test_iter_eval_is_sequential_and_rank_split(tmp_path):
    data = write_shards(tmp_path / "d", [100], val_sizes=(30, 30))
    val = TokenLoader(data, "val", batch_size=2, seq_len=4)
    batches = list(val.iter_eval())
    assert len(batches) == val.batches_per_epoch == 7  # 14 windows of 5 tokens in 60
    assert [int(r[0]) for x, _ in batches for r in x] == [100 + 4 * i for i in range(14)]
    assert len(list(val.iter_eval(max_batches=3))) == 3
    rank1 = TokenLoader(data, "val", batch_size=1, seq_len=4, rank=1, world_size=2)
    assert [int(x[0, 0]) for x, _ in rank1.iter_eval(2)] == [104, 112]


def test_vocab_truncation_and_size_errors(tmp_path):
    data = write_shards(tmp_path / "d", [100, 100], vocab=5000)
    with pytest.raises(DataError, match="vocabulary of 5000 ids, more than the model's vocab_size 4096"):
        TokenLoader(data, "train", batch_size=1, seq_len=8, vocab_size=4096)
    TokenLoader(data, "train", batch_size=1, seq_len=8, vocab_size=5000)
    with pytest.raises(DataError, match="fewer than one global batch"):
        TokenLoader(data, "train", batch_size=64, seq_len=8)
    with (data / "train-00001.bin").open("r+b") as f:
        f.truncate(150)
    with pytest.raises(DataError, match="train-00001.bin is 150 bytes but index.json says 100 tokens"):
        TokenLoader(data, "train", batch_size=1, seq_len=8)
    with pytest.raises(DataError, match="no index.json"):
        TokenLoader(tmp_path, "train", batch_size=1, seq_len=8)
    with pytest.raises(DataError, match="rank 2 is outside world_size 2"):
        TokenLoader(data, "val", batch_size=1, seq_len=8, rank=2, world_size=2)


def test_loader_reads_what_prepare_wrote(tmp_path, small_tokenizer, make_docs):
    docs = make_docs(80)
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(docs))
    prepare([corpus], small_tokenizer, tmp_path / "out", val_fraction=0.0, workers=1, progress=False)
    loader = TokenLoader(tmp_path / "out", "train", batch_size=1, seq_len=16, vocab_size=300)
    x, _ = next(iter(loader.iter_eval(1)))
    assert x[0].tolist() == small_tokenizer.encode("\n".join(docs)).ids[:16]


def test_a_vocabulary_much_smaller_than_the_models_is_reported(tmp_path):
    data = write_shards(tmp_path / "d", [100, 100], vocab=5000)
    with pytest.warns(
        UserWarning, match=r"vocabulary of 5000 ids, fewer than the model's vocab_size 8192: 3192"
    ):
        TokenLoader(data, "train", batch_size=1, seq_len=8, vocab_size=8192)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        TokenLoader(data, "train", batch_size=1, seq_len=8, vocab_size=5120)  # padded to a round size
