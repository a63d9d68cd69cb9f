import json
import os
from collections import Counter

import pytest
import torch
from PIL import Image

from common.data import (DataError, GroupSampler, Item, check_condition_images, load_image, local_slice, load_split,
                         split_exists, strata)


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def jsonl(*rows):
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)


def png(path, color=(255, 0, 0)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), color).save(path)
    return str(path)


# ---- loading ----


def test_txt_skips_blank_lines(tmp_path):
    write(tmp_path / "train.txt", "a cat\n\n   \na dog\n")
    f = str(tmp_path / "train.txt")
    assert load_split(str(tmp_path)) == [Item("a cat", source=f + ":1"), Item("a dog", source=f + ":4")]


def test_jsonl_fields_and_metadata(tmp_path):
    png(tmp_path / "images" / "a.png")
    write(tmp_path / "train.jsonl", jsonl(
        {"prompt": "two apples", "tag": "counting", "count": 2, "extra": {"x": [1]}},
        "",
        {"prompt": "edit it", "negative_prompt": "blurry", "image": "a.png"},
    ))
    a, b = load_split(str(tmp_path))
    assert a == Item("two apples", metadata={"tag": "counting", "count": 2, "extra": {"x": [1]}},
                     source=str(tmp_path / "train.jsonl") + ":1")
    assert b.negative_prompt == "blurry" and b.metadata == {}
    assert b.images == [str(tmp_path / "images" / "a.png")]


def test_image_vs_images_and_absolute_paths(tmp_path):
    absolute = png(tmp_path / "elsewhere" / "z.png")
    png(tmp_path / "images" / "sub" / "b.png")
    write(tmp_path / "videos" / "v.mp4", "not decoded here")
    write(tmp_path / "train.jsonl", jsonl(
        {"prompt": "p", "images": ["sub/b.png", absolute]},
        {"prompt": "q", "video": "v.mp4"},
        {"prompt": "r", "images": []},
    ))
    a, b, c = load_split(str(tmp_path), allow_outside=True)  # `absolute` lies outside images/
    assert a.images == [str(tmp_path / "images" / "sub" / "b.png"), absolute]
    assert b.videos == [str(tmp_path / "videos" / "v.mp4")] and b.images == []
    assert c.images == []
    assert all(os.path.isabs(p) for p in a.images + b.videos)


def test_relative_dataset_path_gives_absolute_images(tmp_path, monkeypatch):
    png(tmp_path / "ds" / "images" / "a.png")
    write(tmp_path / "ds" / "train.jsonl", jsonl({"prompt": "p", "image": "a.png"}))
    monkeypatch.chdir(tmp_path)
    assert load_split("ds")[0].images == [str(tmp_path / "ds" / "images" / "a.png")]


def test_image_dir_override_and_check_files(tmp_path):
    other = tmp_path / "other"
    png(other / "a.png")
    write(tmp_path / "ds" / "train.jsonl", jsonl({"prompt": "p", "image": "a.png"}))
    assert load_split(str(tmp_path / "ds"), image_dir=str(other))[0].images == [str(other / "a.png")]
    with pytest.raises(DataError, match="image not found"):
        load_split(str(tmp_path / "ds"))
    # check_files=False only resolves
    assert load_split(str(tmp_path / "ds"), check_files=False)[0].images == [str(tmp_path / "ds" / "images" / "a.png")]


def test_split_exists_and_test_split(tmp_path):
    write(tmp_path / "train.txt", "a\n")
    assert split_exists(str(tmp_path), "train") and not split_exists(str(tmp_path), "test")
    write(tmp_path / "test.jsonl", jsonl({"prompt": "t"}))
    assert split_exists(str(tmp_path), "test")
    assert [it.prompt for it in load_split(str(tmp_path), "test")] == ["t"]


def test_shipped_datasets_load():
    root = os.path.join(os.path.dirname(__file__), "..", "datasets")
    for name in ("demo", "shapes"):
        assert split_exists(os.path.join(root, name), "train") and split_exists(os.path.join(root, name), "test")
        assert len(load_split(os.path.join(root, name))) > 0 and len(load_split(os.path.join(root, name), "test")) > 0


# ---- errors: one line, naming file and line ----


def raises(tmp_path, match, **kwargs):
    with pytest.raises(DataError) as e:
        load_split(str(tmp_path), **kwargs)
    msg = str(e.value)
    assert "\n" not in msg and match in msg, msg
    return msg


def test_missing_folder_and_split(tmp_path):
    raises(tmp_path / "nope", f"dataset folder not found: {tmp_path / 'nope'}")
    raises(tmp_path, f"no train.txt or train.jsonl in {tmp_path}")
    with pytest.raises(DataError, match="no test.txt or test.jsonl"):
        load_split(str(tmp_path), "test")


def test_both_files_ambiguous(tmp_path):
    write(tmp_path / "train.txt", "a\n")
    write(tmp_path / "train.jsonl", jsonl({"prompt": "a"}))
    raises(tmp_path, "ambiguous")
    with pytest.raises(DataError, match="ambiguous"):
        split_exists(str(tmp_path), "train")


@pytest.mark.parametrize("name,text", [("train.txt", "\n  \n"), ("train.jsonl", "\n"), ("train.txt", "")])
def test_empty_split(tmp_path, name, text):
    write(tmp_path / name, text)
    raises(tmp_path, f"{tmp_path / name} is empty")


@pytest.mark.parametrize("row,match", [
    ('{"prompt": "a",', "invalid JSON ("),
    ('["a list"]', "expected a JSON object, got list"),
    ({"tag": "x"}, "'prompt' must be a non-empty string"),
    ({"prompt": ""}, "'prompt' must be a non-empty string"),
    ({"prompt": 3}, "'prompt' must be a non-empty string"),
    ({"prompt": "a", "negative_prompt": 1}, "'negative_prompt' must be a string"),
    ({"prompt": "a", "image": ["x.png"]}, "'image' must be a non-empty string"),
    ({"prompt": "a", "images": "x.png"}, "'images' must be a list of strings"),
    ({"prompt": "a", "images": ["x.png", 3]}, "'images' must be a list of strings"),
    ({"prompt": "a", "video": 1}, "'video' must be a non-empty string"),
    ({"prompt": "a", "videos": [None]}, "'videos' must be a list of strings"),
    ({"prompt": "a", "image": "x.png", "images": ["y.png"]}, "not both"),
    ({"prompt": "a", "image": "missing.png"}, "image not found: "),
    ({"prompt": "a", "videos": ["missing.mp4"]}, "video not found: "),
])
def test_jsonl_errors_name_file_and_line(tmp_path, row, match):
    # the bad row is on line 3, after a good row and a blank line
    write(tmp_path / "train.jsonl", jsonl({"prompt": "ok"}, "", row))
    msg = raises(tmp_path, match)
    assert msg.startswith(f"{tmp_path / 'train.jsonl'}:3: "), msg


def test_missing_image_names_resolved_path(tmp_path):
    write(tmp_path / "train.jsonl", jsonl({"prompt": "a", "image": "sub/m.png"}))
    raises(tmp_path, f"train.jsonl:1: image not found: {tmp_path / 'images' / 'sub' / 'm.png'}")


def test_non_utf8_file(tmp_path):
    (tmp_path / "train.txt").write_bytes(b"caf\xe9\n")
    raises(tmp_path, "not UTF-8")


# characters str.splitlines() breaks at, which "\n"-ended lines (JSON Lines, text files) keep inside a line
BREAKS = ["\u2028", "\u2029", "\x85", "\x0c", "\x0b", "\x1c", "\x1d", "\x1e", "\r"]


def test_only_newline_ends_a_line(tmp_path):
    rows = "".join(json.dumps({"prompt": f"a{c}b"}, ensure_ascii=False) + "\n" for c in BREAKS) + '{"prompt": "c"}\r\n'
    assert "\u2028" in rows and "\\u2028" not in rows  # written raw (valid JSON), not escaped
    f = write(tmp_path / "train.jsonl", rows + '{"prompt": "d",\n')
    assert raises(tmp_path, "invalid JSON").startswith(f"{f}:{len(BREAKS) + 2}: ")  # lines count "\n" only
    f.write_bytes(rows.encode())
    expected = [f"a{c}b" for c in BREAKS] + ["c"]  # one row each; the CRLF line's \r dropped
    assert [(it.prompt, it.source) for it in load_split(str(tmp_path))] == \
        [(p, f"{f}:{n}") for n, p in enumerate(expected, 1)]
    f.unlink()
    t = tmp_path / "train.txt"
    t.write_bytes("".join(f"{p}\r\n" if p == "c" else f"{p}\n" for p in expected).encode())
    assert [(it.prompt, it.source) for it in load_split(str(tmp_path))] == \
        [(p, f"{t}:{n}") for n, p in enumerate(expected, 1)]


def test_a_jsonl_line_of_non_json_whitespace_is_refused(tmp_path):
    f = write(tmp_path / "train.jsonl", '{"prompt": "a"}\n \t\r\n\x0c\n')  # JSON whitespace is space, tab, CR, LF
    assert raises(tmp_path, "invalid JSON").startswith(f"{f}:3: ")


@pytest.mark.parametrize("row,key", [('{"prompt": "a \\ud800 b"}', "prompt"),
                                     ('{"prompt": "a", "negative_prompt": "\\udfff"}', "negative_prompt"),
                                     ('{"prompt": "a", "tag": {"x": ["ok", "\\ude00"]}}', "tag"),
                                     ('{"prompt": "a", "\\ud83d": 1}', "\ud83d"),
                                     ('{"prompt": "\\ude00\\ud83d"}', "prompt")])  # a pair in the wrong order
def test_lone_surrogates_are_refused_with_file_line_and_key(tmp_path, row, key):
    # json.loads accepts an unpaired \ud800 escape; the tokenizer then fails, after the model has loaded
    f = write(tmp_path / "train.jsonl", jsonl({"prompt": "ok"}, row))
    msg = raises(tmp_path, "holds a lone surrogate")
    assert msg.startswith(f"{f}:2: {key!r} holds a lone surrogate \\u"), msg
    write(f, jsonl('{"prompt": "\\ud83d\\ude00 a", "tag": "\\ud83d\\ude00"}'))  # a full pair: one character
    (item,) = load_split(str(tmp_path))
    assert item.prompt == "\U0001F600 a" and item.metadata == {"tag": "\U0001F600"}


def test_whitespace_only_prompts(tmp_path):
    # jsonl: refused, the row is there but says nothing
    for prompt in ("   ", "\t\u2028\x0c"):
        f = write(tmp_path / "train.jsonl", jsonl({"prompt": "ok"}, "", {"prompt": prompt}))
        assert raises(tmp_path, "'prompt' holds only whitespace") == f"{f}:3: 'prompt' holds only whitespace"
    f.unlink()
    # txt: a line of only whitespace is a blank line, skipped like an empty one; other lines are stripped
    t = write(tmp_path / "train.txt", " a cat \n   \n\t\x0c\u2028\n\x1d\na dog\n")
    assert [(it.prompt, it.source) for it in load_split(str(tmp_path))] == [("a cat", f"{t}:1"), ("a dog", f"{t}:5")]


# ---- images ----


def test_load_image_png_to_rgb(tmp_path):
    path = tmp_path / "a.png"
    Image.new("RGBA", (5, 3), (10, 20, 30, 128)).save(path)
    im = load_image(str(path))
    assert im.mode == "RGB" and im.size == (5, 3) and im.getpixel((0, 0)) == (10, 20, 30)


def test_load_image_corrupt_or_missing(tmp_path):
    bad = write(tmp_path / "x.png", "this is text")
    with pytest.raises(DataError, match=f"cannot read image {bad}: ") as e:
        load_image(str(bad))
    assert "\n" not in str(e.value)
    with pytest.raises(DataError, match="cannot read image"):
        load_image(str(tmp_path / "missing.png"))


# ---- group sampling ----


def test_plan_same_on_every_rank_and_reproducible():
    ranks = [GroupSampler(10, 4, 4, world_size=2, batch_size=2, seed=7) for _ in range(2)]
    torch.manual_seed(0)
    p0 = ranks[0].plan(3)
    torch.manual_seed(123)  # global RNG state must not matter
    p1 = ranks[1].plan(3)
    assert p0 == p1
    assert ranks[0].plan(3) != ranks[0].plan(4)
    assert GroupSampler(10, 4, 4, 2, 2, seed=8).plan(3) != p0


@pytest.mark.parametrize("world,batch", [(1, 4), (2, 2), (2, 3), (3, 2), (3, 4)])
def test_whole_groups_keep_each_group_on_one_process(world, batch):
    """whole_groups: every rank's samples are whole groups (K members, one prompt), the groups of an epoch are the
    same prompts as without it, and every rank runs as many micro-batches; an epoch whose groups cannot split
    evenly over the ranks is refused in one line."""
    s = GroupSampler(20, 6, 4, world_size=world, batch_size=batch, seed=0, whole_groups=True)
    plain = GroupSampler(20, 6, 4, world_size=world, batch_size=batch, seed=0)
    for epoch in range(3):
        p = s.plan(epoch)
        seen = set()
        for rank in range(world):
            items, groups = p.local(rank, world)
            assert Counter(groups) == {g: 4 for g in set(groups)} and not seen & set(groups)  # whole, nowhere else
            assert all(len({i for i, gg in zip(items, groups) if gg == g}) == 1 for g in set(groups))
            assert len(s.local_batches(epoch, rank)) == s.num_batches
            seen |= set(groups)
        assert seen == set(range(6)) and sorted(p.items) == sorted(plain.plan(epoch).items)
    with pytest.raises(DataError, match="^this algorithm keeps each group on one process: prompts_per_epoch 6 must "
                                        "be a multiple of num_processes 4$"):
        GroupSampler(20, 6, 4, world_size=4, batch_size=3, seed=0, whole_groups=True)


def test_plan_groups_are_complete():
    s = GroupSampler(20, 6, 4, world_size=2, batch_size=3, seed=0)
    for epoch in range(5):
        p = s.plan(epoch)
        assert len(p.items) == len(p.groups) == 24
        assert Counter(p.groups) == {g: 4 for g in range(6)}
        by_group = {}
        for i, g in zip(p.items, p.groups):
            by_group.setdefault(g, set()).add(i)
        assert all(len(v) == 1 for v in by_group.values())  # all K members share one prompt
        assert len({next(iter(v)) for v in by_group.values()}) == 6  # M <= N: distinct prompts


def test_local_slices_and_batches_cover_the_plan():
    W, B = 4, 2
    s = GroupSampler(50, 8, 4, world_size=W, batch_size=B, seed=1)
    assert s.num_batches == 4  # 8*4 / (4*2)
    p = s.plan(0)
    items, groups = [], []
    for r in range(W):
        li, lg = p.local(r, W)
        items += li
        groups += lg
        batches = s.local_batches(0, r)
        assert len(batches) == s.num_batches and all(len(b[0]) == len(b[1]) == B for b in batches)
        assert sum((b[0] for b in batches), []) == li and sum((b[1] for b in batches), []) == lg
    assert (items, groups) == (p.items, p.groups)
    with pytest.raises(ValueError):
        p.local(W, W)


def test_groups_span_ranks():
    s = GroupSampler(10, 4, 4, world_size=2, batch_size=2, seed=0)
    spans = False
    for epoch in range(5):
        p = s.plan(epoch)
        ranks_of = {}
        for r in range(2):
            for g in p.local(r, 2)[1]:
                ranks_of.setdefault(g, set()).add(r)
        spans |= any(len(v) > 1 for v in ranks_of.values())
    assert spans


def test_more_prompts_than_items():
    s = GroupSampler(3, 7, 2, world_size=1, batch_size=2, seed=0)
    p = s.plan(0)
    assert Counter(p.groups) == {g: 2 for g in range(7)}
    per_prompt = Counter(i for i, g in set(zip(p.items, p.groups)))
    assert set(per_prompt) == {0, 1, 2} and max(per_prompt.values()) - min(per_prompt.values()) <= 1


def test_divisibility_error_suggests_valid_m():
    with pytest.raises(DataError) as e:
        GroupSampler(100, 5, 4, world_size=8, batch_size=1, seed=0)
    msg = str(e.value)
    assert "prompts_per_epoch*group_size = 5*4 = 20 samples must be divisible by num_processes*batch_size = 8*1 = 8" in msg
    assert msg.endswith("nearest valid prompts_per_epoch: 4 or 6")
    GroupSampler(100, 4, 4, 8, 1, 0), GroupSampler(100, 6, 4, 8, 1, 0)  # the suggestions are valid
    with pytest.raises(DataError, match="nearest valid prompts_per_epoch: 3$"):
        GroupSampler(100, 1, 1, 3, 1, 0)


@pytest.mark.parametrize("bad", range(5))
def test_sizes_must_be_positive(bad):
    sizes = [10, 2, 2, 1, 1]
    sizes[bad] = 0
    with pytest.raises(DataError, match="must be >= 1, got 0"):
        GroupSampler(*sizes, seed=0)


# ---- gather ----


def test_local_slice_round_trip():
    W = 3
    per_rank = [torch.arange(4, dtype=torch.float32).reshape(2, 2) + 10 * r for r in range(W)]
    gathered = torch.cat(per_rank)  # what accelerator.gather returns: every rank's tensor, concatenated in rank order
    for r in range(W):
        assert torch.equal(local_slice(gathered, r, W), per_rank[r])
    x = torch.tensor([1.0, 2.0])
    assert torch.equal(local_slice(x, 0, 1), x)  # one process: identity
    with pytest.raises(ValueError, match="equal counts"):
        local_slice(torch.ones(3), 0, 2)


def test_sampler_plus_gather_keeps_groups_aligned():
    # rewards computed per rank, gathered, then grouped by the plan's global group ids: invariant I.21
    W, B = 2, 2
    s = GroupSampler(10, 4, 4, world_size=W, batch_size=B, seed=3)
    plan = s.plan(0)
    local = [torch.tensor(plan.local(r, W)[1], dtype=torch.float32) for r in range(W)]  # "reward" = group id
    gathered = torch.cat(local)
    assert gathered.tolist() == plan.groups
    for r in range(W):
        assert torch.equal(local_slice(gathered, r, W), local[r])


# ---- condition images (edit models): checked before any model loads ----


def test_condition_images_counted_and_readable(tmp_path):
    (tmp_path / "images").mkdir()
    Image.new("RGB", (64, 64)).save(tmp_path / "images" / "a.png")  # 4x4 is below flux1-kontext's 16x16
    (tmp_path / "images" / "bad.png").write_bytes(b"not a png")
    write(tmp_path / "train.jsonl", jsonl({"prompt": "p1", "image": "a.png"}, {"prompt": "p2"},
                                          {"prompt": "p3", "images": ["a.png", "bad.png"]}))
    items = load_split(str(tmp_path))
    f = str(tmp_path / "train.jsonl")
    check_condition_images(items[:1], "one", "flux1-kontext")
    check_condition_images(items[:2], "optional", "flux2")
    check_condition_images(items[:2], "none", "flux1")  # images for the rewards only: decoded all the same
    with pytest.raises(DataError, match=f"^{f}:3: unreadable image .*bad.png"):
        check_condition_images(items, "none", "flux1")
    with pytest.raises(DataError, match=f"^{f}:2: flux1-kontext needs exactly one condition image"):
        check_condition_images(items, "one", "flux1-kontext")
    with pytest.raises(DataError, match=f"^{f}:2: qwen-image-edit-plus needs at least one condition image"):
        check_condition_images(items, "many", "qwen-image-edit-plus")
    with pytest.raises(DataError, match=f"^{f}:3: unreadable image .*bad.png"):
        check_condition_images(items[2:], "many", "qwen-image-edit-plus")


def test_balanced_plan_spreads_prompts_over_labels():
    labels = ["a"] * 2 + ["b"] * 3 + ["c"] * 20  # 25 rows, labels of very different sizes
    s = GroupSampler(25, 6, 4, world_size=1, batch_size=4, seed=5, strata=labels)
    per_label = Counter()
    for epoch in range(30):
        p = s.plan(epoch)
        assert Counter(p.groups) == {g: 4 for g in range(6)}
        prompts = {g: i for i, g in zip(p.items, p.groups)}
        assert len(set(prompts.values())) == 6  # distinct prompts within the epoch
        counts = Counter(labels[i] for i in prompts.values())
        assert counts == {"a": 2, "b": 2, "c": 2}  # M = 6 over 3 labels: exactly 2 each, even for the 2-row label
        per_label.update(labels[i] for i in prompts.values())
    assert GroupSampler(25, 6, 4, 1, 4, seed=5, strata=labels).plan(7) == s.plan(7)  # reproducible
    # uneven: M = 4 over 3 labels gives each label 1 or 2 prompts; a label's prompts repeat only once exhausted
    s = GroupSampler(25, 4, 2, 1, 2, seed=0, strata=labels)
    for epoch in range(10):
        counts = Counter(labels[i] for i in set(s.plan(epoch).items))
        assert sorted(counts.values()) == [1, 1, 2]


def test_balanced_plan_by_a_jsonl_key(tmp_path):
    rows = [{"prompt": f"p{i}", "tag": "x" if i < 2 else "y"} for i in range(6)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    items = load_split(str(tmp_path), "train")
    assert strata(items, "") is None
    assert strata(items, "tag") == ['"x"'] * 2 + ['"y"'] * 4
    (tmp_path / "train.jsonl").write_text(json.dumps(rows[0]) + "\n" + json.dumps({"prompt": "q"}) + "\n")
    with pytest.raises(DataError, match=r"train.jsonl:2: --balance-prompts-by tag: the row has no 'tag' key"):
        strata(load_split(str(tmp_path), "train"), "tag")
