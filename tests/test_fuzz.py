"""Fuzz tests (hypothesis): the config loader and the image-name parsing fail only with our clear errors."""
import os
import os.path as osp
import string
import tempfile

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ptl_torchreid.config import ConfigError, config_keys, load_config
from ptl_torchreid.data import DatasetRootError, check_dataset_root, parse_image_name
from ptl_torchreid.data.check import PATTERNS
from ptl_torchreid.data.synthetic import read_split

FUZZ = settings(max_examples=150, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

KEYS = config_keys()
SECTIONS = sorted({k.split(".")[0] for k in KEYS})

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-10 ** 12, max_value=10 ** 12),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
    st.sampled_from(["auto", "True", "off", "1e-3", "-1", "[1, 2]", "{model}", "{model.x}", "{0}", "{", "}",
                     "ptl_osnet_x0_25", "RandomIdentitySampler", "market1501", "synthetic_reid", "nan"]),
)
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                      max_leaves=8)
keys = st.one_of(st.sampled_from(KEYS), st.sampled_from(SECTIONS), st.text(max_size=20),
                 st.sampled_from(KEYS).map(lambda k: k[:-1]), st.sampled_from(KEYS).map(lambda k: k + ".x"))


def _nest(flat):
    """{'a.b': v} -> {'a': {'b': v}} for some keys, to exercise sections as YAML mappings."""
    out = {}
    for k, v in flat.items():
        parts = k.split(".") if isinstance(k, str) and k and "." in k and len(k) % 2 else [k]
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                break
        else:
            node[parts[-1]] = v
    return out


@FUZZ
@given(st.dictionaries(keys, values, max_size=6))
def test_config_file_fuzz(data):
    with tempfile.TemporaryDirectory() as d:
        path = osp.join(d, "cfg.yaml")
        with open(path, "w") as f:
            yaml.safe_dump(_nest(data), f)
        try:
            cfg = load_config(path)
        except ConfigError as e:
            assert str(e)
        else:
            assert cfg.train.lr > 0


@FUZZ
@given(st.text(max_size=200))
def test_config_file_text_fuzz(text):
    with tempfile.TemporaryDirectory() as d:
        path = osp.join(d, "cfg.yaml")
        with open(path, "w", encoding="utf-8", errors="surrogatepass") as f:
            try:
                f.write(text)
            except UnicodeEncodeError:
                return
        try:
            load_config(path)
        except ConfigError as e:
            assert str(e)


override_values = st.one_of(
    st.text(max_size=30),
    values.map(repr),
    st.builds(lambda k, v: f"{{{k!r}: {v!r}}}", values, values),  # Python literals with any key
    st.sampled_from(["[", "{[1]: 2}", "(" * 300 + ")" * 300, "1e999", "-1", "0", "None", "True", "'x'",
                     "[1, 'a']", "{}", "()", "1+2j", "b'x'", "--config-file"]),
)


@FUZZ
@given(st.lists(st.tuples(keys, override_values), max_size=5), st.booleans())
def test_config_override_fuzz(pairs, odd):
    opts = [x for pair in pairs for x in pair]
    if odd and opts:
        opts = opts[:-1]
    try:
        cfg = load_config(opts=opts)
    except ConfigError as e:
        assert str(e)
    else:
        assert cfg.train.batch_size >= 1


names = st.one_of(
    st.text(max_size=40),
    st.builds(lambda pid, cam, rest: f"{pid}_c{cam}{rest}",
              st.integers(-10 ** 30, 10 ** 30), st.integers(-5, 10 ** 20), st.text(max_size=10)),
    st.from_regex(r"\A-?\d{1,6}_c\d{1,3}s\d_\d{6}_\d{2}\.(jpg|png)\Z"),
)


@FUZZ
@given(names, st.sampled_from(sorted(PATTERNS)))
def test_parse_image_name_fuzz(name, pattern):
    try:
        pid, cam = parse_image_name(name, pattern)
    except ValueError as e:
        assert str(e)
    else:
        p = PATTERNS[pattern]
        assert isinstance(pid, int) and isinstance(cam, int)
        assert pid in p.junk_pids or p.pid_range[0] is None or pid >= p.pid_range[0]
        assert p.cam_range[0] is None or cam >= p.cam_range[0]


def _safe_filename(name):
    name = name.replace("/", "_").replace("\0", "_")
    return name if name not in ("", ".", "..") and len(name.encode("utf-8", "surrogatepass")) < 200 else None


file_names = st.lists(st.one_of(names, st.text(alphabet=string.printable, max_size=20)).map(
    lambda n: n + ".jpg" if not n.endswith((".jpg", ".png")) else n), max_size=6)


@settings(max_examples=40, deadline=None, database=None)
@given(file_names)
def test_split_reading_fuzz(files):
    """The synthetic datasets' split reader and the dataset checker on folders of arbitrary file names."""
    with tempfile.TemporaryDirectory() as root:
        split = osp.join(root, "bounding_box_train")
        os.makedirs(split)
        for name in files:
            name = _safe_filename(name)
            if name is None:
                continue
            try:
                with open(osp.join(split, name), "wb") as f:
                    f.write(b"not an image")
            except (OSError, UnicodeEncodeError):
                continue
        try:
            items = read_split(split, relabel=True)
        except ValueError as e:
            assert "does not follow" in str(e) or "outside" in str(e)
        else:
            assert sorted({pid for _, pid, _ in items}) == list(range(len({pid for _, pid, _ in items})))
        try:
            report = check_dataset_root(root, pattern="market-style", num_workers=1)
        except DatasetRootError as e:
            assert "holds no images" in str(e)
        else:
            train = report.splits["train"]
            assert train.num_images == len(train.empty) + len(train.unreadable) + len(train.mislabeled) \
                + train.num_ok
            assert not report.ok
