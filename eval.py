"""
Evaluation: the LLaVA-1.5 scorers (SPEC 6) and the shapes-world held-out evaluation (SPEC 8).

    python eval.py --ckpt out/avgpool                  # prints a table, writes out/avgpool/eval.json
    python eval.py --ckpt=out/avgpool --limit=50       # quick look: first 50 questions per task
    python eval.py --table out                         # one table of every out/<run>/eval.json
"""
import dataclasses
import json
import math
import os
import re
import sys
from dataclasses import dataclass

import torch
from safetensors import safe_open
from tqdm import tqdm

import data
from model import load_model
from train import parse_args

# -----------------------------------------------------------------------------
# config

@dataclass
class EvalConfig:
    ckpt: str = "out/avgpool"
    eval_dir: str = ""        # default: <shapes_root>/eval of the checkpoint's training config
    image_folder: str = ""    # default: <shapes_root>/images
    out: str = ""             # metrics JSON; default: <ckpt>/eval.json (answers go next to it)
    batch_size: int = 32
    max_new_tokens: int = 32
    limit: int = 0            # > 0: only the first `limit` questions of each task
    device: str = ""          # default: cuda if available, else cpu
    table: str = ""           # a folder of runs (out/): compare their eval.json in one markdown table, evaluate nothing


# -----------------------------------------------------------------------------
# scorers (SPEC 6)

# The official VQA evaluation rules (GT-Vision-Lab vqaEval.py), rewritten.
PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = {"a", "an", "the"}
# The official table maps each contraction written with one apostrophe missing to its proper spelling
# ("dont" -> "don't", "couldnt've" -> "couldn't've"); forms whose bare spelling is a word (we'd, it's) are absent.
CONTRACTED = """ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't
he'd he'd've he's how'd how'll how's isn't it'd it'd've it'll ma'am mightn't mightn't've might've mustn't must've
needn't not've o'clock oughtn't 'ow's'at shan't she'd've should've shouldn't shouldn't've somebody'd've somebody'll
somebody's someone'd someone'd've someone'll someone's something'd something'd've something'll that's there'd
there'd've there're there's they'd they'd've they'll they're they've 'twas wasn't we'd've we've weren't what'll
what're what's what've when's where'd where's where've who'd who'd've who'll who's who've why'll why're why's won't
would've wouldn't wouldn't've y'all y'all'll y'all'd've you'd you'd've you'll you're you've""".split()
CONTRACTIONS = {w[:i] + w[i + 1:]: w for w in CONTRACTED for i, c in enumerate(w) if c == "'"}


def normalize_answer(s):
    s = s.replace("\n", " ").replace("\t", " ").strip()
    # a punctuation mark touching a space, or any digit comma ("1,000") in the answer, is deleted; otherwise it splits
    delete = re.search(r"\d,\d", s) is not None
    for p in PUNCT:
        s = s.replace(p, "" if delete or p + " " in s or " " + p in s else " ")
    s = re.sub(r"\.(?!\d)", "", s)  # periods go unless a digit follows ("3.5" keeps its point)
    words = [NUMBER_WORDS.get(w, w) for w in s.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def vqa_accuracy(pred, gt_answers):
    """Mean over the leave-one-out subsets of the human answers of min(#matches / 3, 1); one answer: exact match."""
    pred = normalize_answer(pred)
    gts = [normalize_answer(a) for a in gt_answers]
    if len(gts) == 1:
        return float(pred == gts[0])
    matches = sum(g == pred for g in gts)
    # leaving out a matching answer leaves matches - 1 matches, leaving out any other leaves all of them
    return sum(min((matches - (g == pred)) / 3, 1.0) for g in gts) / len(gts)


def parse_yes_no(text):
    sentence = text.split(".")[0].replace(",", "")  # POPE (LLaVA eval_pope): first sentence only
    words = sentence.split()
    return "no" if "No" in words or "no" in words or "not" in words else "yes"


def pope_metrics(preds, labels):
    """preds: question id -> answer text; labels: question id -> "yes"/"no". Positive class = yes."""
    if set(preds) != set(labels):
        missing, extra = set(labels) - set(preds), set(preds) - set(labels)
        raise ValueError(f"pope_metrics: prediction ids do not match label ids "
                         f"({len(missing)} without a prediction, e.g. {sorted(map(str, missing))[:3]}; "
                         f"{len(extra)} without a label, e.g. {sorted(map(str, extra))[:3]})")
    tp = fp = tn = fn = 0
    for qid, label in labels.items():
        label = label.strip().lower().rstrip(".")
        if label not in ("yes", "no"):
            raise ValueError(f"pope_metrics: question {qid}: label must be yes or no, got {label!r}")
        pred_yes, label_yes = parse_yes_no(preds[qid]) == "yes", label == "yes"
        tp += pred_yes and label_yes
        fp += pred_yes and not label_yes
        tn += not pred_yes and not label_yes
        fn += not pred_yes and label_yes
    n = len(labels)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return dict(accuracy=(tp + tn) / n if n else 0.0, precision=precision, recall=recall, f1=f1,
                yes_ratio=(tp + fp) / n if n else 0.0)


def parse_letter(text, letters="ABCD", strict=True):
    """Strict: the whole answer is one letter, optionally followed by "." (SEED/MMBench exact match).
    Lenient: the letter the answer starts with ("B. circle", "(B)"). None when there is none."""
    text = text.strip()
    if strict:
        m = re.fullmatch(r"([A-Z])\.?", text)
    else:
        m = re.match(r"\(?([A-Z])(?![A-Za-z])", text)
    return m.group(1) if m and m.group(1) in letters else None


NUMBER = r"\s*(-?\d+(?:\.\d*)?|-?\.\d+)\s*"
BOX = re.compile(r"\[" + ",".join([NUMBER] * 4) + r"\]")


def parse_box(text):
    m = BOX.search(text)
    return [float(x) for x in m.groups()] if m else None


def box_iou(a, b):
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    area = lambda r: max(0.0, r[2] - r[0]) * max(0.0, r[3] - r[1])
    union = area(a) + area(b) - inter
    return inter / union if union > 0 else 0.0

# -----------------------------------------------------------------------------
# generation

@torch.no_grad()
def generate_answers(model, tokenizer, image_processor, records, image_folder, batch_size=32, max_new_tokens=128):
    """Greedy answers (one string per record, in the records' order) to "<image>\\n" + record["text"]."""
    prompts = [data.prompt_ids(tokenizer, data.IMAGE_TOKEN + "\n" + r["text"]) for r in records]
    order = sorted(range(len(records)), key=lambda i: len(prompts[i]))  # similar lengths together: less padding
    answers = [None] * len(records)
    for start in tqdm(range(0, len(order), batch_size), desc="generate", unit="batch"):
        idx = order[start:start + batch_size]
        images = [data.load_image(os.path.join(image_folder, records[i]["image"]), image_processor, "pad") for i in idx]
        pixel_values = torch.stack(images)  # [B, 3, H, W], left on the CPU: generate moves it
        new_ids = model.generate([prompts[i] for i in idx], pixel_values, max_new_tokens=max_new_tokens,
                                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        for i, ids in zip(idx, new_ids):
            answers[i] = tokenizer.decode(ids, skip_special_tokens=True).strip()
    return answers

# -----------------------------------------------------------------------------
# the shapes-world evaluation (SPEC 8)

HEADLINE = {"colour": "accuracy", "shape": "accuracy", "count": "accuracy", "existence": "f1", "relpos": "f1",
            "mc": "accuracy", "grounding": "acc_iou50"}


def score_shapes(task, records, answers):
    if len(records) != len(answers):
        raise ValueError(f"score_shapes({task}): {len(records)} records but {len(answers)} answers")
    n = len(records)
    mean = lambda xs: sum(xs) / n if n else 0.0
    if task in ("colour", "shape", "count"):
        return dict(n=n, accuracy=mean([vqa_accuracy(a, [r["answer"]]) for r, a in zip(records, answers)]))
    if task in ("existence", "relpos"):
        preds = {r["question_id"]: a for r, a in zip(records, answers)}
        return dict(n=n, **pope_metrics(preds, {r["question_id"]: r["answer"] for r in records}))
    if task == "mc":
        gts = [parse_letter(r["answer"], strict=False) for r in records]  # the answer is "B" (or "B. ...")
        return dict(n=n, accuracy=mean([parse_letter(a) == g for g, a in zip(gts, answers)]),
                    accuracy_lenient=mean([parse_letter(a, strict=False) == g for g, a in zip(gts, answers)]))
    if task == "grounding":
        # shapes-world images are square, so the `square` and `orig` box spaces of SPEC 6 coincide
        boxes = [parse_box(a) for a in answers]
        hits = [b is not None and box_iou(b, r["bbox"]) >= 0.5 for r, b in zip(records, boxes)]
        return dict(n=n, acc_iou50=mean(hits), unparseable=mean([b is None for b in boxes]))
    raise ValueError(f"score_shapes: unknown task {task!r}; expected one of {data.TASKS}")


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def evaluate_shapes(model, tokenizer, image_processor, eval_dir, image_folder, out_path=None, batch_size=32,
                    max_new_tokens=32, limit=0):
    """Scores each {task}.jsonl found in eval_dir. With out_path: metrics JSON there, answers_{task}.jsonl beside it."""
    tasks = [t for t in data.TASKS if os.path.exists(os.path.join(eval_dir, f"{t}.jsonl"))]
    if not tasks:
        raise ValueError(f"{eval_dir}: no question files ({', '.join(t + '.jsonl' for t in data.TASKS)})")
    model.eval()
    results = {}
    for task in tasks:
        records = read_jsonl(os.path.join(eval_dir, f"{task}.jsonl"))
        records = records[:limit] if limit > 0 else records
        print(f"{task}: {len(records)} questions")
        answers = generate_answers(model, tokenizer, image_processor, records, image_folder, batch_size,
                                   max_new_tokens)
        results[task] = score_shapes(task, records, answers)
        if out_path:
            rows = [dict(question_id=r["question_id"], text=a, answer=r["answer"]) for r, a in zip(records, answers)]
            write_jsonl(os.path.join(os.path.dirname(out_path) or ".", f"answers_{task}.jsonl"), rows)
    if out_path:
        with open(out_path, "w") as f:
            json.dump(results, f, indent=2)
    return results


def format_table(results):
    lines = [f"{'task':<10} {'metric':<10} {'value':>7} {'n':>6}"]
    for task, metrics in results.items():
        key = HEADLINE.get(task, "accuracy")
        lines.append(f"{task:<10} {key:<10} {100 * metrics[key]:>6.1f}% {metrics['n']:>6}")
    return "\n".join(lines)


def compare_runs(root):
    """One markdown table: a row per run folder under root that holds eval.json, with its projector, visual tokens
    M and trainable projector parameters (from the checkpoint), and each task's headline metric."""
    rows, tasks = [], []
    for run in sorted(os.listdir(root)):
        path = os.path.join(root, run)
        if not os.path.isfile(os.path.join(path, "eval.json")):
            continue
        with open(os.path.join(path, "eval.json")) as f:
            results = json.load(f)
        with open(os.path.join(path, "ckpt", "config.json")) as f:
            cfg = json.load(f)
        with safe_open(os.path.join(path, "ckpt", "model.safetensors"), "pt") as f:
            params = sum(math.prod(f.get_slice(k).get_shape())
                         for k in f.keys() if k.startswith("projector."))
        tasks += [t for t in results if t not in tasks]
        rows.append((run, cfg["projector"], cfg["num_tokens"], params, results))
    if not rows:
        raise SystemExit(f"{root}: no run folder with an eval.json")
    lines = ["| run | projector | M | projector params | " + " | ".join(f"{t} ({HEADLINE.get(t, 'accuracy')})"
                                                                  for t in tasks) + " |",
             "|" + " --- |" * (4 + len(tasks))]
    for run, projector, m, params, results in rows:
        cells = [f"{100 * results[t][HEADLINE.get(t, 'accuracy')]:.1f}" if t in results else "-" for t in tasks]
        lines.append(f"| {run} | {projector} | {m} | {params:,} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def shapes_paths(cfg, train_cfg):
    """eval_dir and image_folder: from the command line, else from the shapes world the checkpoint was trained on."""
    root = train_cfg.get("shapes_root")
    if not root and not (cfg.eval_dir and cfg.image_folder):
        raise SystemExit(f"{cfg.ckpt}: its training config names no shapes_root; pass --eval_dir and --image_folder")
    return cfg.eval_dir or os.path.join(root, "eval"), cfg.image_folder or os.path.join(root, "images")

# -----------------------------------------------------------------------------

if __name__ == "__main__":
    cfg, _ = parse_args(EvalConfig, sys.argv[1:])
    if cfg.table:
        print(compare_runs(cfg.table))
        sys.exit()
    print(json.dumps(dataclasses.asdict(cfg), indent=2))
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer, image_processor, train_cfg = load_model(cfg.ckpt, device=device)
    eval_dir, image_folder = shapes_paths(cfg, train_cfg)
    out_path = cfg.out or os.path.join(cfg.ckpt, "eval.json")
    results = evaluate_shapes(model, tokenizer, image_processor, eval_dir, image_folder, out_path, cfg.batch_size,
                              cfg.max_new_tokens, cfg.limit)
    print(format_table(results))
    print(f"wrote {out_path}")
