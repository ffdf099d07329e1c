"""wr_train.tasks: every real format from small files written exactly as the releases
ship them, the stand-in tasks through the same registry, and each bad input."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from wr_train.tasks import REGISTRY, SEED_TASKS, TaskError, canonical_name, load_task, load_tasks, \
    majority_share, parse_task_list


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def jsonl(path: Path, rows: list[dict]) -> Path:
    return write(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


# ---------------------------------------------------------------- UER TSV

def test_uer_single_columns_by_name(tmp_path):
    """UER's datasets/douban_book_review: header, label first; columns found by name."""
    d = tmp_path / "douban_book_review"
    write(d / "train.tsv", "label\ttext_a\n"
                           "0\t挺没有意思的一本书，总觉得韩寒这人吧，老这样写小说真的挺没劲的。\n"
                           "1\t很好看的书，推荐！\n"
                           "1\t不错\n")
    # dev with the columns in another order, an extra column, CRLF line ends and a BOM
    write(d / "dev.tsv", "\ufefftext_a\tqid\tlabel\r\n还行吧\t7\t1\r\n太差了\t8\t0\r\n\r\n")
    write(d / "test.tsv", "label\ttext_a\n0\t一般般\n")
    task = load_task("douban", str(tmp_path))
    assert task.name == "douban" and task.kind == "single"
    assert task.labels == ["0", "1"]
    assert task.train[0].text_a.startswith("挺没有意思") and task.train[0].text_b is None
    assert [(e.text_a, e.label) for e in task.dev] == [("还行吧", 1), ("太差了", 0)]
    assert task.test_labelled and task.test[0].label == 0
    assert majority_share([ex.label for ex in task.train], [ex.label for ex in task.dev]) == 0.5  # train majority is "1"
    assert load_task("douban_book_review", str(tmp_path)).name == "douban"


def test_uer_pair_and_test_nolabel(tmp_path):
    d = tmp_path / "lcqmc"
    write(d / "train.tsv", "text_a\ttext_b\tlabel\n喜欢打篮球的男生喜欢什么样的女生\t爱打篮球的男生喜欢什么样的女生\t1\n"
                           "我手机丢了，我想换个手机\t我想买个新手机，求推荐\t1\n大家觉得她好看吗\t大家觉得跑男好看吗？\t0\n")
    write(d / "dev.tsv", "text_a\ttext_b\tlabel\n开初婚未育证明怎么弄？\t初婚未育情况证明怎么开？\t1\n")
    write(d / "test_nolabel.tsv", "text_a\ttext_b\n谁有狂三这张高清的\t这张高清图，谁有\n")
    task = load_task("lcqmc", str(tmp_path))
    assert task.kind == "pair"
    assert task.train[2].text_b == "大家觉得跑男好看吗？" and task.train[2].label == 0
    assert task.test[0].label is None and not task.test_labelled
    assert task.summary().endswith("test 1 (unlabelled)")


# ---------------------------------------------------------------- CLUE JSON

TNEWS_LABELS = [("100", "news_story"), ("101", "news_culture"), ("102", "news_entertainment"),
                ("103", "news_sports"), ("104", "news_finance"), ("106", "news_house"),
                ("107", "news_car"), ("108", "news_edu"), ("109", "news_tech"), ("110", "news_military"),
                ("112", "news_travel"), ("113", "news_world"), ("114", "news_stock"),
                ("115", "news_agriculture"), ("116", "news_game")]


def test_tnews_public_with_labels_json(tmp_path):
    d = tmp_path / "tnews_public"
    jsonl(d / "train.json", [
        {"label": "102", "label_desc": "news_entertainment", "sentence": "江疏影甜甜圈自拍，迷之角度竟这么好看，美吸引一切事物",
         "keywords": "江疏影,美少女,经纪人,甜甜圈"},
        {"label": "110", "label_desc": "news_military", "sentence": "以色列大规模空袭开始！伊朗多个军事目标遭遇打击", "keywords": "伊朗,圣城军"},
        {"label": "104", "label_desc": "news_finance", "sentence": "出栏一头猪亏损300元，究竟谁能笑到最后！", "keywords": "商品猪,养猪"}])
    jsonl(d / "dev.json", [{"label": "104", "label_desc": "news_finance", "sentence": "以前很火的巴铁为何现在只字不提？",
                            "keywords": "巴铁"}])
    jsonl(d / "test.json", [{"id": 0, "sentence": "在设计史上，每当相对稳定的发展时期，", "keywords": "设计史"}])
    jsonl(d / "labels.json", [{"label": l, "label_desc": desc} for l, desc in TNEWS_LABELS])
    task = load_task("tnews", str(tmp_path))
    assert task.labels == [l for l, _ in TNEWS_LABELS]  # the 15 classes, labels.json's order
    assert task.train[1].label == task.labels.index("110")
    assert task.label_desc["116"] == "news_game"
    assert task.test and not task.test_labelled


def test_iflytek_key_and_type_variants(tmp_path):
    """IFLYTEK: `label_des` (some copies `label_desc`), labels as strings or ints."""
    d = tmp_path / "iflytek_public"
    jsonl(d / "train.json", [
        {"label": "11", "label_des": "薅羊毛", "sentence": "《钱街》是一款专为城市白领打造的手机赚钱软件"},
        {"label": 110, "label_des": "社区超市", "sentence": "朴朴快送超市创立于2016年"},
        {"label": "2", "label_desc": "免费WIFI", "sentence": "WiFi万能钥匙"},
        {"label": 11, "label_desc": "薅羊毛", "sentence": "趣头条"}])
    jsonl(d / "dev.json", [{"label": 2, "label_des": "免费WIFI", "sentence": "连WiFi"},
                           {"label": "110", "label_des": "社区超市", "sentence": "盒马"}])
    task = load_task("iflytek", str(tmp_path))
    assert task.labels == ["2", "11", "110"]  # numeric order, ints and strings merged
    assert [e.label for e in task.train] == [1, 2, 0, 1]
    assert [e.label for e in task.dev] == [0, 2]
    assert task.label_desc == {"11": "薅羊毛", "110": "社区超市", "2": "免费WIFI"}
    assert task.test == []


def test_ocnli_skips_dash_rows(tmp_path):
    d = tmp_path / "ocnli_public"
    row = {"level": "medium", "sentence1": "身上裹一件工厂发的棉大衣,手插在袖筒里", "sentence2": "身上至少一件衣服",
           "label": "entailment", "label0": "entailment", "label1": "entailment", "label2": "entailment",
           "label3": "entailment", "label4": "entailment", "genre": "lit", "prem_id": "lit_635", "id": 0}
    jsonl(d / "train.50k.json", [row,
                                 {**row, "sentence2": "身上没有衣服", "label": "contradiction", "id": 1},
                                 {**row, "sentence2": "棉大衣是新的", "label": "-", "id": 2},
                                 {**row, "sentence2": "他很冷", "label": "neutral", "id": 3}])
    jsonl(d / "dev.json", [{**row, "label": "neutral"}, {**row, "label": "-"}])
    jsonl(d / "test.json", [{"sentence1": "来回一趟象我们两天的路程", "sentence2": "那趟路程需要两天", "genre": "news", "id": 0}])
    task = load_task("ocnli", str(tmp_path))
    assert task.kind == "pair" and task.labels == ["contradiction", "entailment", "neutral"]
    assert len(task.train) == 3 and len(task.dev) == 1
    assert task.skipped == {"train": 1, "dev": 1}
    assert task.train[1].text_b == "身上没有衣服"
    assert not task.test_labelled


def test_user_tasks_by_file_format(tmp_path):
    jsonl(tmp_path / "mynli" / "train.json", [{"sentence1": "a", "sentence2": "b", "label": "x"},
                                              {"sentence1": "c", "sentence2": "d", "label": "y"}])
    jsonl(tmp_path / "mynli" / "dev.json", [{"sentence1": "e", "sentence2": "f", "label": "y"}])
    write(tmp_path / "mysent" / "train.tsv", "label\ttext_a\n1\tgood\n0\tbad\n")
    write(tmp_path / "mysent" / "dev.tsv", "label\ttext_a\n1\tfine\n")
    nli, sent = load_task("mynli", str(tmp_path)), load_task("mysent", str(tmp_path))
    assert (nli.kind, nli.labels, nli.dev[0].label) == ("pair", ["x", "y"], 1)
    assert (sent.kind, sent.labels) == ("single", ["0", "1"])
    # --data may point at the task directory itself
    assert load_task("mysent", str(tmp_path / "mysent")).train[0].text_a == "good"


def test_registry_names():
    assert SEED_TASKS == ("douban", "chnsenticorp", "lcqmc", "tnews", "iflytek", "ocnli")
    for alias, name in [("douban_book_review", "douban"), ("tnews_public", "tnews"),
                        ("iflytek_public", "iflytek"), ("ocnli_public", "ocnli"), ("ChnSentiCorp", "chnsenticorp")]:
        assert canonical_name(alias) == name
    assert {REGISTRY[n].kind for n in ("lcqmc", "ocnli")} == {"pair"}
    assert parse_task_list("all") == list(SEED_TASKS)
    assert parse_task_list(" douban, lcqmc ,") == ["douban", "lcqmc"]


def test_demo_stand_in_tasks_load(demo_dir):
    manifest = json.loads((demo_dir / "demo_manifest.json").read_text())
    tasks = load_tasks(SEED_TASKS, str(demo_dir / "tasks"))
    for name, task in tasks.items():
        for split in ("train", "dev", "test"):
            assert len(getattr(task, split)) == manifest["tasks"][name][split]["rows"], (name, split)
            assert len(task.labels) == len(manifest["tasks"][name]["train"]["labels"])
        assert task.test_labelled
    assert tasks["lcqmc"].kind == tasks["ocnli"].kind == "pair"
    assert len(tasks["tnews"].labels) == 10 and tasks["iflytek"].label_desc["0"] == "正面"


# ---------------------------------------------------------------- bad input

def _tsv_task(tmp_path, train: str, dev: str = "label\ttext_a\n1\tok\n", name="chnsenticorp"):
    write(tmp_path / name / "train.tsv", train)
    write(tmp_path / name / "dev.tsv", dev)


def test_missing_or_renamed_column(tmp_path):
    _tsv_task(tmp_path, "label\tsentence\n1\tgood\n")
    with pytest.raises(TaskError) as e:
        load_task("chnsenticorp", str(tmp_path))
    msg = str(e.value)
    assert "train.tsv:1" in msg and "'text_a'" in msg and "found columns: label, sentence" in msg
    assert "\n" not in msg
    write(tmp_path / "lcqmc" / "train.tsv", "label\ttext_a\n1\ta\n")
    write(tmp_path / "lcqmc" / "dev.tsv", "label\ttext_a\ttext_b\n1\ta\tb\n")
    with pytest.raises(TaskError, match=r"lcqmc/train.tsv:1: missing column 'text_b'"):
        load_task("lcqmc", str(tmp_path))


def test_short_tsv_row(tmp_path):
    _tsv_task(tmp_path, "label\ttext_a\n1\tgood\n0\n")
    with pytest.raises(TaskError, match=r"train.tsv:3: 1 tab-separated fields, the header has 2"):
        load_task("chnsenticorp", str(tmp_path))


def test_malformed_json_line(tmp_path):
    jsonl(tmp_path / "tnews" / "dev.json", [{"label": "100", "sentence": "a"}])
    write(tmp_path / "tnews" / "train.json", '{"label": "100", "sentence": "a"}\n{"label": "100", "sentence": \n')
    with pytest.raises(TaskError, match=r"tnews/train.json:2: not a valid JSON line"):
        load_task("tnews", str(tmp_path))


def test_json_missing_key(tmp_path):
    jsonl(tmp_path / "ocnli" / "train.json", [{"premise": "a", "hypothesis": "b", "label": "neutral"}])
    jsonl(tmp_path / "ocnli" / "dev.json", [{"sentence1": "a", "sentence2": "b", "label": "neutral"}])
    with pytest.raises(TaskError, match=r"train.json:1: no string 'sentence1' or 'sentence2' key "
                                        r"\(found keys: premise, hypothesis, label"):
        load_task("ocnli", str(tmp_path))


def test_dev_label_unseen_in_train(tmp_path):
    _tsv_task(tmp_path, "label\ttext_a\n1\tgood\n0\tbad\n", "label\ttext_a\n1\tok\n2\t?\n")
    with pytest.raises(TaskError, match=r"dev.tsv:3: label '2' does not occur in train.tsv \(train labels: 0, 1\)"):
        load_task("chnsenticorp", str(tmp_path))


def test_train_label_missing_from_labels_json(tmp_path):
    jsonl(tmp_path / "tnews" / "train.json", [{"label": "100", "sentence": "a"}, {"label": "999", "sentence": "b"}])
    jsonl(tmp_path / "tnews" / "dev.json", [{"label": "100", "sentence": "a"}])
    jsonl(tmp_path / "tnews" / "labels.json", [{"label": "100", "label_desc": "news_story"}])
    with pytest.raises(TaskError, match=r"train.json:2: label '999' is not in .*labels.json"):
        load_task("tnews", str(tmp_path))


def test_empty_split(tmp_path):
    _tsv_task(tmp_path, "label\ttext_a\n1\tgood\n", "label\ttext_a\n")
    with pytest.raises(TaskError, match=r"dev.tsv: empty split"):
        load_task("chnsenticorp", str(tmp_path))
    jsonl(tmp_path / "ocnli" / "train.json", [{"sentence1": "a", "sentence2": "b", "label": "-"}])
    jsonl(tmp_path / "ocnli" / "dev.json", [{"sentence1": "a", "sentence2": "b", "label": "neutral"}])
    with pytest.raises(TaskError, match=r"train.json: empty split .*“-” labels"):
        load_task("ocnli", str(tmp_path))


def test_missing_dev_file_and_unknown_task(tmp_path):
    write(tmp_path / "douban" / "train.tsv", "label\ttext_a\n1\tgood\n")
    with pytest.raises(TaskError, match=r"no dev file \(expected one of dev.tsv, dev.json\)"):
        load_task("douban", str(tmp_path))
    with pytest.raises(TaskError, match=r"task 'cmnli': not a built-in task \(douban, chnsenticorp"):
        load_task("cmnli", str(tmp_path))
    with pytest.raises(TaskError, match=r"task 'lcqmc': no directory"):
        load_task("lcqmc", str(tmp_path))
    with pytest.raises(TaskError, match=r"--data .*nowhere: no such directory"):
        load_task("douban", str(tmp_path / "nowhere"))
    with pytest.raises(TaskError, match="given twice"):
        _tsv_task(tmp_path, "label\ttext_a\n1\tgood\n", name="douban")
        load_tasks(["douban", "douban_book_review"], str(tmp_path))


def test_bad_label_values_and_encoding(tmp_path):
    jsonl(tmp_path / "tnews" / "train.json", [{"label": ["100"], "sentence": "a"}])
    jsonl(tmp_path / "tnews" / "dev.json", [{"label": "100", "sentence": "a"}])
    with pytest.raises(TaskError, match=r"train.json:1: label \['100'\]: expected a string or an integer"):
        load_task("tnews", str(tmp_path))
    (tmp_path / "douban").mkdir()
    (tmp_path / "douban" / "train.tsv").write_bytes("label\ttext_a\n1\t好\n".encode("gbk"))
    write(tmp_path / "douban" / "dev.tsv", "label\ttext_a\n1\tok\n")
    with pytest.raises(TaskError, match=r"train.tsv: not UTF-8 text"):
        load_task("douban", str(tmp_path))
