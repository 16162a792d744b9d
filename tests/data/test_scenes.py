import numpy as np
import pytest

from hashret.data.scenes import (ATTRIBUTES, OBJECTS, Vocabulary, load_precomp, load_scenes,
                                 make_scenes, tokenize)
from hashret.errors import HashretError


def test_precomp_layout_loads_with_five_captions_per_image(tmp_path):
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("dev", 2), ("test", 3)):
        np.save(tmp_path / f"{split}_ims.npy", rng.normal(size=(n, 36, 16)).astype(np.float32))
        caps = [f"a {split} photo number {i} of a dog" for i in range(5 * n)]
        if split == "test":
            caps[0] = "zebras everywhere"  # words unseen in training map to <unk>
        (tmp_path / f"{split}_caps.txt").write_text("\n".join(caps) + "\n")
    ds = load_precomp(tmp_path)
    assert set(ds.parts) == {"train", "dev", "test"} and ds.region_dim == 16
    test = ds.part("test")
    assert test.n_images == 3 and test.n_captions == 15
    np.testing.assert_array_equal(test.caption_image, np.repeat(np.arange(3), 5))
    assert "zebras" not in ds.vocab.ids and "dev" not in ds.vocab.ids  # train captions only
    assert test.tokens[0, 0] == 1 and test.lengths[0] == 2
    x, m = test.image_batch([2, 0])
    assert x.shape == (2, 36, 16) and m.all()
    np.testing.assert_array_equal(x[0], np.load(tmp_path / "test_ims.npy")[2])
    assert [list(c) for c in test.captions_of([1])] == [list(range(5, 10))]
    assert load_scenes(f"precomp:{tmp_path}").fingerprint() == ds.fingerprint()


def test_precomp_errors_name_the_problem(tmp_path):
    with pytest.raises(HashretError, match="does not exist"):
        load_precomp(tmp_path / "missing")
    np.save(tmp_path / "train_ims.npy", np.zeros((3, 4, 8), np.float32))
    (tmp_path / "train_caps.txt").write_text("a\nb\nc\nd\n")
    with pytest.raises(HashretError, match="whole number per image"):
        load_precomp(tmp_path)
    np.save(tmp_path / "train_ims.npy", np.zeros((3, 8), np.float32))
    with pytest.raises(HashretError, match="N x n_regions x dim"):
        load_precomp(tmp_path)


def test_synthetic_scenes_plant_bindings_and_twins():
    ds = make_scenes(n_train=40, n_dev=0, n_test=30, captions_per_image=2, twin_fraction=1.0,
                     min_objects=3, max_objects=5, seed=3)
    assert ds.synthetic and "SYNTHETIC" in ds.source
    train = ds.part("train")
    assert train.n_captions == 80 and train.regions.shape[1] == 5 + 3
    assert (train.mask.sum(1) >= 4).all()
    # padded regions are zero and masked out
    assert (train.regions[~train.mask] == 0).all()
    for c in train.captions[:10]:
        words = tokenize(c)
        objs = [w for w in words if w in OBJECTS]
        assert 2 <= len(objs) <= 3
        for o in objs:  # every named object comes right after its attribute
            assert words[words.index(o) - 1] in ATTRIBUTES
    # twins: the same objects, two of them with swapped attributes; the first caption of each
    # names both swapped objects, so it tells the twins apart
    test = ds.part("test")
    for a, b in ((0, 1), (2, 3)):
        fa, fb = test.facts[a], test.facts[b]
        assert [f.split()[1] for f in fa] == [f.split()[1] for f in fb]
        diff = [i for i, (x, y) in enumerate(zip(fa, fb)) if x != y]
        assert len(diff) == 2
        i, j = diff
        assert fa[i].split()[0] == fb[j].split()[0] and fa[j].split()[0] == fb[i].split()[0]
        first = test.captions[test.captions_of([a])[0][0]]
        assert fa[i] in first and fa[j] in first
    again = make_scenes(n_train=40, n_dev=0, n_test=30, captions_per_image=2, twin_fraction=1.0,
                        min_objects=3, max_objects=5, seed=3)
    assert again.fingerprint() == ds.fingerprint()
    assert make_scenes(n_train=40, n_dev=0, n_test=30, seed=4).fingerprint() != ds.fingerprint()


def test_scene_spec_options_and_errors():
    ds = load_scenes("scenes:n_train=20,n_dev=0,n_test=10,region_dim=12")
    assert ds.region_dim == 12 and ds.part("database") is ds.part("test")
    with pytest.raises(HashretError, match="unknown scenes option"):
        load_scenes("scenes:n_trian=20")
    with pytest.raises(HashretError, match="no part"):
        ds.part("dev")


def test_vocabulary_query_needs_a_known_word():
    v = Vocabulary.build(["a red cube", "a blue ball"])
    tokens, lengths, known, unknown = v.encode_query("A red zebra")
    assert known == ["a", "red"] and unknown == ["zebra"] and lengths[0] == 3
    with pytest.raises(HashretError, match="no word of the query"):
        v.encode_query("zebra giraffe")
    with pytest.raises(HashretError, match="empty"):
        v.encode_query("  ")


def test_graded_scenes_come_in_families_and_graded_zero_is_the_default_generator():
    # graded=0 draws exactly the scenes the generator always drew (same data, same fingerprint);
    # graded > 0 makes that share of scenes relatives of an earlier one: one binding changed
    base = make_scenes(n_train=60, n_dev=0, n_test=40, twin_fraction=0.0, seed=3)
    same = make_scenes(n_train=60, n_dev=0, n_test=40, twin_fraction=0.0, graded=0.0, seed=3)
    assert same.fingerprint() == base.fingerprint()

    def closest_shared(ds):
        facts = [set(f) for f in ds.part("test").facts]
        return [max(len(a & b) / len(a) for j, b in enumerate(facts) if j != i) for i, a in enumerate(facts)]

    graded = make_scenes(n_train=60, n_dev=0, n_test=40, twin_fraction=0.0, graded=0.8, seed=3)
    near = np.array(closest_shared(graded))
    assert np.mean(near >= 0.5) > 0.7 > np.mean(np.array(closest_shared(base)) >= 0.5)
    facts = [set(f) for f in graded.part("test").facts]
    # a relative differs from some earlier scene in exactly one binding
    one_off = sum(any(len(facts[i] ^ facts[j]) == 2 and len(facts[i]) == len(facts[j]) for j in range(i))
                  for i in range(1, len(facts)))
    assert one_off >= 0.6 * (len(facts) - 1)
    with pytest.raises(HashretError, match="graded must lie in"):
        make_scenes(n_train=10, n_dev=0, n_test=10, graded=1.5)
