"""
Evaluation: LLaVA-1.5's scorers and benchmarks, and the held-out question files of the shapes world (shapes.py).

    python eval.py --ckpt out/avgpool                  # prints a table, writes out/avgpool/eval.json
    python eval.py --ckpt=out/avgpool --limit=50       # quick look: first 50 questions per task
    python eval.py --ckpt CKPT --bench pope --data_root playground/data/eval
                                                       # a benchmark of the paper in LLaVA-1.5's layout: answers
                                                       # (resumable) and scores in CKPT/pope/
"""
import base64
import csv
import dataclasses
import io
import json
import os
import re
import sys
from dataclasses import dataclass

import torch
from tqdm import tqdm

import data
from config import parse_args
from model import load_model

# -----------------------------------------------------------------------------
# config

@dataclass
class EvalConfig:
    ckpt: str = "out/avgpool"
    eval_dir: str = ""        # default: <shapes_root>/eval of the checkpoint's training config
    image_folder: str = ""    # default: <shapes_root>/images; with --bench: the benchmark's image folder
    out: str = ""             # metrics JSON; default: <ckpt>/eval.json (answers go next to it)
                              # with --bench: the folder of <bench>/answers.jsonl and scores.json; default: <ckpt>
    batch_size: int = 32
    max_new_tokens: int = 32
    limit: int = 0            # > 0: only the first `limit` questions of each task
    device: str = ""          # default: cuda if available, else cpu
    bench: str = ""           # a benchmark of the paper: pope vqav2 vizwiz textvqa gqa mme seed mmbench refcoco(+/g)
    data_root: str = ""       # LLaVA-1.5's ./playground/data/eval, laid out as its docs/Evaluation.md says
    question_file: str = ""   # another question file than the layout's (a val split, RefCOCO testA, ...)
    box_space: str = "square" # RefCOCO answers normalised to the padded square or to the original image
    circular: bool = False    # MMBench CircularEval: ask every circular shift of the options


# -----------------------------------------------------------------------------
# scorers (LLaVA-1.5's evaluation: its scripts and the official VQA code)

# The answer normalisation of the official VQA evaluation (GT-Vision-Lab/VQA
# PythonEvaluationTools/vqaEvaluation/vqaEval.py: processPunctuation, processDigitArticle), which the VQAv2 and VizWiz
# servers score with; LLaVA's EvalAIAnswerProcessor (llava/eval/m4c_evaluator.py) repeats it after a step of its own.
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
CONTRACTIONS["somebody'd"] = "somebodyd"  # the official table holds this one too, the other way round


def process_punctuation(s):
    # a mark that touches a space in s, or any mark once s holds a digit comma ("1,000"), is deleted; any other mark
    # becomes a space
    digit_comma = re.search(r"\d,\d", s) is not None
    out = s
    for p in PUNCT:
        out = out.replace(p, "" if digit_comma or p + " " in s or " " + p in s else " ")
    # a period goes unless a digit follows ("3.5"); vqaEval passes re.UNICODE (32) where sub takes its count, so at
    # most 32 periods go
    return re.sub(r"\.(?!\d)", "", out, count=32)


def process_digit_article(s):
    words = [NUMBER_WORDS.get(w, w) for w in s.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def normalize_answer(s):
    """vqaEval's normalisation of an answer (used where the human answers of a question differ)."""
    return process_digit_article(process_punctuation(s.replace("\n", " ").replace("\t", " ").strip()))


def evalai_answer(s):
    """LLaVA's EvalAIAnswerProcessor (llava/eval/m4c_evaluator.py): eval_textvqa.py applies it to the prediction
    and the human answers, scripts/convert_{vqav2,vizwiz}_for_submission.py to the answers they submit."""
    # its word_tokenize: every comma and "?" goes, a possessive splits off ("man's" -> "man 's")
    return normalize_answer(s.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip())


def leave_one_out(pred, humans):
    """Mean over the humans of min(1, #other humans who gave pred / 3) (vqaEval.py, m4c_evaluator.py)."""
    matches = sum(h == pred for h in humans)
    return sum(min(1, (matches - (h == pred)) / 3) for h in humans) / len(humans)


def textvqa_accuracy(pred, humans):
    """LLaVA's eval_textvqa.py (TextVQAAccuracyEvaluator in m4c_evaluator.py)."""
    return leave_one_out(evalai_answer(pred), [evalai_answer(h) for h in humans])


def vqa_accuracy(pred, humans):
    """What the VQAv2 and VizWiz servers (vqaEval.py) give the answer LLaVA submits, evalai_answer(pred).
    One human answer (the shapes world): exact match after normalisation."""
    if len(humans) == 1:
        return float(normalize_answer(pred) == normalize_answer(humans[0]))
    pred = evalai_answer(pred)
    humans = [h.replace("\n", " ").replace("\t", " ").strip() for h in humans]
    if len(set(humans)) > 1:  # vqaEval normalises only where the humans differ, else it compares the raw strings
        pred, humans = normalize_answer(pred), [normalize_answer(h) for h in humans]
    return leave_one_out(pred, humans)


def parse_yes_no(text):
    # LLaVA's llava/eval/eval_pope.py: the first sentence, commas dropped, words split at single spaces only
    words = text.split(".")[0].replace(",", "").split(" ")
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
    # eval_pope.py divides by zero where nothing is a true yes (no yes answered, or no yes label); 0 here
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
def generate_answers(model, tokenizer, image_processor, records, image_folder, batch_size=32, max_new_tokens=128,
                     on_answer=None, desc="generate"):
    """Greedy answers (one string per record, in the records' order) to "<image>\\n" + record["text"]. The image is
    record["image"]: a path under image_folder, or the image file's bytes. on_answer(i, answer) sees each answer
    as soon as its batch is done."""
    prompts = [data.prompt_ids(tokenizer, data.IMAGE_TOKEN + "\n" + r["text"]) for r in records]
    order = sorted(range(len(records)), key=lambda i: len(prompts[i]))  # similar lengths together: less padding
    answers = [None] * len(records)
    for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch"):
        idx = order[start:start + batch_size]
        images = [data.load_image(image_source(records[i]["image"], image_folder), image_processor, "pad") for i in idx]
        pixel_values = torch.stack(images)  # [B, 3, H, W], left on the CPU: generate moves it
        new_ids = model.generate([prompts[i] for i in idx], pixel_values, max_new_tokens=max_new_tokens,
                                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        for i, ids in zip(idx, new_ids):
            answers[i] = tokenizer.decode(ids, skip_special_tokens=True).strip()
            if on_answer:
                on_answer(i, answers[i])
    return answers


def image_source(image, image_folder):
    return io.BytesIO(image) if isinstance(image, bytes) else os.path.join(image_folder, image)

# -----------------------------------------------------------------------------
# the shapes-world evaluation (shapes.py writes its question files)

HEADLINE = {"colour": "accuracy", "shape": "accuracy", "count": "accuracy", "existence": "f1",
            "position": "accuracy", "relpos": "f1", "mc": "accuracy", "grounding": "acc_iou50"}


def score_shapes(task, records, answers):
    if len(records) != len(answers):
        raise ValueError(f"score_shapes({task}): {len(records)} records but {len(answers)} answers")
    n = len(records)
    mean = lambda xs: sum(xs) / n if n else 0.0
    if task in ("colour", "shape", "count", "position"):
        return dict(n=n, accuracy=mean([vqa_accuracy(a, [r["answer"]]) for r, a in zip(records, answers)]))
    if task in ("existence", "relpos"):
        preds = {r["question_id"]: a for r, a in zip(records, answers)}
        return dict(n=n, **pope_metrics(preds, {r["question_id"]: r["answer"] for r in records}))
    if task == "mc":
        gts = [parse_letter(r["answer"], strict=False) for r in records]  # the answer is "B" (or "B. ...")
        return dict(n=n, accuracy=mean([parse_letter(a) == g for g, a in zip(gts, answers)]),
                    accuracy_lenient=mean([parse_letter(a, strict=False) == g for g, a in zip(gts, answers)]))
    if task == "grounding":
        # shapes-world images are square, so the `square` and `orig` box spaces coincide
        boxes = [parse_box(a) for a in answers]
        hits = [b is not None and box_iou(b, r["bbox"]) >= 0.5 for r, b in zip(records, boxes)]
        return dict(n=n, acc_iou50=mean(hits), unparseable=mean([b is None for b in boxes]))
    raise ValueError(f"score_shapes: unknown task {task!r}; expected one of {tuple(HEADLINE)}")


def read_jsonl(path, fields=()):
    """One JSON object a line; a bad line, or one without a field in fields, fails naming the file, line and field."""
    rows = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: line {n}: not valid JSON ({e})") from None
            for key in fields:
                field(row, key, f"{path}: line {n}")
            rows.append(row)
    return rows


def field(record, key, where):
    if not isinstance(record, dict) or key not in record:
        raise ValueError(f"{where}: field {key!r} is missing")
    return record[key]


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def evaluate_shapes(model, tokenizer, image_processor, eval_dir, image_folder, out_path=None, batch_size=32,
                    max_new_tokens=32, limit=0):
    """Scores each {task}.jsonl found in eval_dir. With out_path: metrics JSON there, answers_{task}.jsonl beside it."""
    tasks = [t for t in HEADLINE if os.path.exists(os.path.join(eval_dir, f"{t}.jsonl"))]
    if not tasks:
        raise ValueError(f"{eval_dir}: no question files ({', '.join(t + '.jsonl' for t in HEADLINE)})")
    model.eval()
    results = {}
    for task in tasks:
        records = read_jsonl(os.path.join(eval_dir, f"{task}.jsonl"))
        records = records[:limit] if limit > 0 else records
        answers = generate_answers(model, tokenizer, image_processor, records, image_folder, batch_size,
                                   max_new_tokens, desc=f"{task}, {len(records)} questions")
        results[task] = score_shapes(task, records, answers)
        if out_path:
            rows = [dict(question_id=r["question_id"], text=a, answer=r["answer"]) for r, a in zip(records, answers)]
            write_jsonl(os.path.join(os.path.dirname(out_path) or ".", f"answers_{task}.jsonl"), rows)
    if out_path:
        with open(out_path, "w") as f:
            json.dump(results, f, indent=2)
    return results


# -----------------------------------------------------------------------------
# what eval.py prints for a shapes-world checkpoint, and where it finds its questions


def format_table(results):
    lines = [f"{'task':<10} {'metric':<10} {'value':>7} {'n':>6}"]
    for task, metrics in results.items():
        key = HEADLINE.get(task, "accuracy")
        lines.append(f"{task:<10} {key:<10} {100 * metrics[key]:>6.1f}% {metrics['n']:>6}")
    return "\n".join(lines)


def shapes_paths(cfg, train_cfg):
    """eval_dir and image_folder: from the command line, else from the shapes world the checkpoint was trained on."""
    root = train_cfg.get("shapes_root")
    if not root and not (cfg.eval_dir and cfg.image_folder):
        raise SystemExit(f"{cfg.ckpt}: its training config names no shapes_root; pass --eval_dir and --image_folder")
    return cfg.eval_dir or os.path.join(root, "eval"), cfg.image_folder or os.path.join(root, "images")

# -----------------------------------------------------------------------------
# the paper's benchmarks, in LLaVA-1.5's layout
#
# data_root is LLaVA's ./playground/data/eval (docs/Evaluation.md of haotian-liu/LLaVA). LLaVA's question files
# already end with LLaVA-1.5's prompt suffixes, so the prompt builders add only what a question lacks. An answer
# belongs to the question with its question id and prompt: TextVQA's ids are image ids and MME's repeat for the two
# questions of an image, so the id alone does not single a question out.

UNANSWERABLE = "\nWhen the provided information is insufficient, respond with 'Unanswerable'."
POPE_SPLITS = ("adversarial", "popular", "random")
MME_PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork",
                  "OCR")
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
# the spatial subsets of the paper's Table 2
MMBENCH_SPATIAL = ("spatial_relationship", "object_localization", "physical_relation")
SEED_SPATIAL = {6: "spatial relation", 4: "instance location"}  # SEED-Bench question_type_id -> name


def mean(xs):
    xs = list(xs)
    return sum(xs) / len(xs) if xs else 0.0


def with_suffix(text, *parts):
    """text ending in parts, whether or not it already ended in some or all of them."""
    for p in reversed(parts):
        text = text.removesuffix(p)
    return text + "".join(parts)


def short_answer(q):
    return with_suffix(q["text"], data.SHORT_ANSWER)


def vizwiz_prompt(q):
    return with_suffix(q["text"], UNANSWERABLE, data.SHORT_ANSWER)


def multiple_choice(q):  # LLaVA's SEED question file holds the "\nA. ..." options in the text
    return with_suffix(q["text"], data.MC_SUFFIX)


def grounding(q):
    head = data.GROUNDING_PROMPT.format(ref="")
    return q["text"] if q["text"].startswith(head) else data.GROUNDING_PROMPT.format(ref=q["text"])


def answer_key(row):
    return str(row["question_id"]), row["prompt"]


def match(questions, answers):
    """The answer text of each question, found by question id and prompt, never by position."""
    texts = {answer_key(a): a["text"] for a in answers}
    missing = [q for q in questions if answer_key(q) not in texts]
    if missing:
        raise ValueError(f"{len(missing)} of {len(questions)} questions have no answer, "
                         f"e.g. question_id {missing[0]['question_id']!r}")
    return [texts[answer_key(q)] for q in questions]


def read_json(path):
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None

# ---- question files

def llava_questions(path, prompt, fields=()):
    questions = read_jsonl(path, ("question_id", "image", "text") + fields)
    for q in questions:
        q["prompt"] = prompt(q)
    return questions


def is_none(value):  # an empty MMBench cell, as LLaVA's model_vqa_mmbench reads it
    return value is None or value.strip().lower() in ("", "nan", "none")


def read_mmbench(path, circular):
    """MMBench's TSV -> questions, prompted as LLaVA's model_vqa_mmbench does: hint, question, "A. ..." options,
    the MC suffix; images decoded from base64 in memory. The TSV also holds MMBench's own circular copies of each
    question (index + k * 1e6): skipped, since circular asks every circular shift of the options itself, and the
    correct letter moves with its option."""
    csv.field_size_limit(2**31 - 1)  # the base64 images are longer than csv's default limit
    questions = []
    with open(path, newline="") as f:
        rows = csv.DictReader(f, delimiter="\t")
        for column in ("index", "question", "A", "B", "image"):
            if column not in (rows.fieldnames or []):
                raise ValueError(f"{path}: no column {column!r} (columns: {rows.fieldnames})")
        for row in rows:
            where = f"{path}: line {rows.line_num}"
            for column in ("index", "question", "image"):
                if is_none(row[column]):
                    raise ValueError(f"{where}: field {column!r} is empty")
            if not row["index"].strip().isdigit():
                raise ValueError(f"{where}: field 'index' is not a number: {row['index']!r}")
            index = int(row["index"])
            if index >= 1_000_000:
                continue
            options = []
            for letter in "ABCD":
                if is_none(row.get(letter)):
                    break
                options.append(row[letter])
            letters = "ABCD"[:len(options)]
            answer = None if is_none(row.get("answer")) else row["answer"].strip()
            if answer is not None and answer not in letters:
                raise ValueError(f"{where}: field 'answer' is {answer!r}, not one of the options {letters}")
            try:
                image = base64.b64decode(row["image"], validate=True)
            except ValueError as e:
                raise ValueError(f"{where}: field 'image' is not base64 ({e})") from None
            head = row["question"] if is_none(row.get("hint")) else row["hint"] + "\n" + row["question"]
            for r in range(len(options) if circular else 1):
                shifted = options[r:] + options[:r]
                prompt = head + "".join(f"\n{l}. {o}" for l, o in zip(letters, shifted)) + data.MC_SUFFIX
                truth = None if answer is None else letters[(letters.index(answer) - r) % len(letters)]
                questions.append(dict(question_id=index, round=r, prompt=prompt, image=image, letters=letters,
                                      answer=truth, category=row.get("category") or ""))
    return questions

# ---- annotation files

def read_pope(folder):
    """POPE's coco_pope_{split}.json (one JSON a line) -> {split: {(image, question): "yes" or "no"}}."""
    labels = {}
    for split in POPE_SPLITS:
        rows = read_jsonl(os.path.join(folder, f"coco_pope_{split}.json"), ("image", "text", "label"))
        labels[split] = {(r["image"], r["text"].strip()): r["label"] for r in rows}
    return labels


def read_vqav2(path):
    """The official v2_mscoco_*_annotations.json -> {question_id: the ten human answers}."""
    humans = {}
    for i, a in enumerate(field(read_json(path), "annotations", path)):
        where = f"{path}: annotation {i}"
        humans[field(a, "question_id", where)] = [field(x, "answer", where) for x in field(a, "answers", where)]
    return humans


def read_vizwiz(path):
    """VizWiz's val.json (a list, one question per image) -> {image: the ten human answers}."""
    humans = {}
    for i, a in enumerate(read_json(path)):
        where = f"{path}: record {i}"
        humans[field(a, "image", where)] = [field(x, "answer", where) for x in field(a, "answers", where)]
    return humans


def read_textvqa(path):
    """TextVQA_0.5.1_val.json -> {(image id, lower-cased question): the ten human answers}."""
    humans = {}
    for i, a in enumerate(field(read_json(path), "data", path)):
        where = f"{path}: record {i}"
        humans[field(a, "image_id", where), field(a, "question", where).lower()] = field(a, "answers", where)
    return humans


def read_gqa(path):
    """GQA's testdev_balanced_questions.json ({question id: {..., "answer"}}) -> {question id: answer}."""
    return {str(qid): field(q, "answer", f"{path}: question {qid}") for qid, q in read_json(path).items()}


def mme_question(text):
    """A question as MME's files and LLaVA's llava_mme.jsonl both spell it: without the short-answer suffix and
    MME's own "Please answer yes or no." (LLaVA drops the latter; MME's files sometimes have two spaces before it)."""
    return " ".join(text.replace(data.SHORT_ANSWER.strip(), "").replace("Please answer yes or no.", "").split())


def read_mme(folder):
    """MME_Benchmark_release_version: a folder per subtask holding, per image, <image>.txt of "question<TAB>Yes|No"
    lines (in questions_answers_YN/ where the images sit in images/) -> {(subtask, image, question): "yes"|"no"}."""
    truth = {}
    for subtask in sorted(os.listdir(folder)):
        qa = os.path.join(folder, subtask, "questions_answers_YN")
        qa = qa if os.path.isdir(qa) else os.path.join(folder, subtask)
        if not os.path.isdir(qa):
            continue
        for name in sorted(n for n in os.listdir(qa) if n.endswith(".txt")):
            path = os.path.join(qa, name)
            with open(path) as f:
                for n, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    parts = line.rstrip("\r\n").split("\t")
                    if len(parts) != 2 or parts[1].strip().lower() not in ("yes", "no"):
                        raise ValueError(f"{path}: line {n}: expected 'question<TAB>Yes' or 'question<TAB>No'")
                    truth[subtask, name[:-4], mme_question(parts[0])] = parts[1].strip().lower()
    return truth


def read_seed(path):
    """SEED-Bench.json -> {question id: {answer, type_id, type, data_type}}."""
    top = read_json(path)
    names = {v: k for k, v in field(top, "question_type", path).items()}
    truth = {}
    for i, q in enumerate(field(top, "questions", path)):
        where = f"{path}: question {i}"
        type_id = field(q, "question_type_id", where)
        truth[str(field(q, "question_id", where))] = dict(answer=field(q, "answer", where), type_id=type_id,
                                                          type=names.get(type_id, str(type_id)),
                                                          data_type=q.get("data_type", "image"))
    return truth

# ---- scorers: (questions, answers, annotations, cfg) -> metrics; no model needed

def score_pope(questions, answers, labels, cfg=None):
    """Per split. LLaVA's question file numbers its questions its own way, so each question finds its
    label in its split's POPE file by image and question, and its prediction by question id."""
    preds = match(questions, answers)
    scores = {}
    for split in sorted({q["category"] for q in questions}):
        if split not in labels:
            raise ValueError(f"pope: questions of split {split!r}, which has no labels; splits: {POPE_SPLITS}")
        p, l = {}, {}
        for q, text in zip(questions, preds):
            if q["category"] == split:
                key = (q["image"], q["text"].removesuffix(data.SHORT_ANSWER).strip())
                if key not in labels[split]:
                    raise ValueError(f"pope: question {q['question_id']} {key} is not in coco_pope_{split}.json")
                p[q["question_id"]], l[q["question_id"]] = text, labels[split][key]
        scores[split] = dict(n=len(l), **pope_metrics(p, l))
    splits = [scores[s] for s in POPE_SPLITS if s in scores]
    return dict(scores, mean_f1=mean(s["f1"] for s in splits), mean_accuracy=mean(s["accuracy"] for s in splits))


def vqa_scores(questions, preds, humans, key, accuracy=vqa_accuracy):
    """VQA accuracy where the human answers of every question are known; of none: a test split, which
    only its server scores."""
    keys = [key(q) for q in questions]
    known = [humans is not None and k in humans for k in keys]
    if not any(known):
        return dict(n=len(questions))
    if not all(known):
        raise ValueError(f"{known.count(False)} of {len(keys)} questions have no human answers in the annotation "
                         f"file, e.g. {keys[known.index(False)]!r}")
    return dict(n=len(keys), accuracy=mean(accuracy(p, humans[k]) for p, k in zip(preds, keys)))


def score_vqav2(questions, answers, humans, cfg=None):
    return vqa_scores(questions, match(questions, answers), humans, lambda q: q["question_id"])


def score_vizwiz(questions, answers, humans, cfg=None):
    return vqa_scores(questions, match(questions, answers), humans, lambda q: q["image"])


def score_textvqa(questions, answers, humans, cfg=None):
    # LLaVA's eval_textvqa: a question is its image and its first line, the question before the OCR tokens
    key = lambda q: (os.path.splitext(os.path.basename(q["image"]))[0], q["text"].split("\n")[0].lower())
    return vqa_scores(questions, match(questions, answers), humans, key, textvqa_accuracy)


def truth_of(q, truth, where):
    t = truth.get(str(q["question_id"]))
    if t is None:
        raise ValueError(f"{where}: question {q['question_id']!r} is not in the annotation file")
    return t


def score_gqa(questions, answers, truth, cfg=None):
    """Strip the trailing period, lower-case, exact match."""
    right = [p.strip().rstrip(".").lower() == truth_of(q, truth, "gqa").lower()
             for q, p in zip(questions, match(questions, answers))]
    return dict(n=len(right), accuracy=mean(right))


def parse_mme(text):
    """yes, no or other from the first four characters of the answer (MME's calculation.py)."""
    head = text.strip().lower()[:4]
    return "yes" if "yes" in head else "no" if "no" in head else "other"


def score_mme(questions, answers, truth, cfg=None):
    """Per subtask, in MME's points: accuracy over questions, accuracy+ over images (both of its questions
    right), score = accuracy + accuracy+ (0-200); perception and cognition sum the scores of their subtasks.
    LLaVA's question ids are "<subtask>/.../<image file>", one per image."""
    right = {}  # subtask -> image -> [right, ...]
    for q, p in zip(questions, match(questions, answers)):
        parts = str(q["question_id"]).split("/")
        key = (parts[0], os.path.splitext(parts[-1])[0], mme_question(q["text"]))
        if key not in truth:
            raise ValueError(f"mme: question {q['question_id']!r} {key[2]!r} is not in MME's answer files")
        right.setdefault(key[0], {}).setdefault(key[1], []).append(parse_mme(p) == truth[key])
    scores = {}
    for subtask, images in right.items():
        acc = mean(r for rs in images.values() for r in rs)
        acc_plus = mean(all(rs) for rs in images.values())
        scores[subtask] = dict(n=sum(map(len, images.values())), accuracy=100 * acc, accuracy_plus=100 * acc_plus,
                               score=100 * (acc + acc_plus))
    total = lambda names: sum(scores[s]["score"] for s in names if s in scores)
    return dict(scores, perception=total(MME_PERCEPTION), cognition=total(MME_COGNITION),
                spatial={"position": scores["position"]["score"]} if "position" in scores else {})


def score_seed(questions, answers, truth, cfg=None):
    """Letter exact match, and a lenient first-letter parse; per data type and question type."""
    rows = []
    for q, p in zip(questions, match(questions, answers)):
        t = truth_of(q, truth, "seed: SEED-Bench.json")
        rows.append((t, parse_letter(p) == t["answer"], parse_letter(p, strict=False) == t["answer"]))
    scores = dict(n=len(rows), accuracy=mean(r for _, r, _ in rows), accuracy_lenient=mean(r for _, _, r in rows))
    for data_type in sorted({t["data_type"] for t, _, _ in rows}):
        scores[f"accuracy_{data_type}"] = mean(r for t, r, _ in rows if t["data_type"] == data_type)
    scores["types"] = {name: mean(r for t, r, _ in rows if t["type"] == name)
                       for name in sorted({t["type"] for t, _, _ in rows})}
    scores["spatial"] = {name: mean(r for t, r, _ in rows if t["type_id"] == i)
                         for i, name in SEED_SPATIAL.items() if any(t["type_id"] == i for t, _, _ in rows)}
    return scores


def score_mmbench(questions, answers, ann=None, cfg=None):
    """Letter exact match, and a lenient first-letter parse, on each question as first asked. With
    CircularEval's rounds, a question counts only if every circular shift of its options was answered right."""
    if any(q["answer"] is None for q in questions):
        return dict(n=len({q["question_id"] for q in questions}))  # a test split: no answers, only the server scores
    first, rounds = {}, {}
    for q, p in zip(questions, match(questions, answers)):
        strict = parse_letter(p, q["letters"]) == q["answer"]
        rounds.setdefault(q["question_id"], []).append(strict)
        if q["round"] == 0:
            lenient = parse_letter(p, q["letters"], strict=False) == q["answer"]
            first[q["question_id"]] = (strict, lenient, q["category"])
    circular = any(q["round"] > 0 for q in questions)
    right = {i: all(rs) for i, rs in rounds.items()} if circular else {i: f[0] for i, f in first.items()}
    scores = dict(n=len(first), accuracy=mean(f[0] for f in first.values()),
                  accuracy_lenient=mean(f[1] for f in first.values()))
    if circular:
        scores["accuracy_circular"] = mean(right.values())
    scores["spatial"] = {c: mean(right[i] for i, f in first.items() if f[2] == c)
                         for c in MMBENCH_SPATIAL if any(f[2] == c for f in first.values())}
    return scores


def to_pixels(box, width, height, box_space):
    """A normalised [x1, y1, x2, y2] in pixels of the original image. square: normalised to the image
    padded to a centred square of side S = max(W, H), so x = x' * S - (S - W) / 2; orig: x = x' * W."""
    if box_space == "orig":
        return [box[0] * width, box[1] * height, box[2] * width, box[3] * height]
    s = max(width, height)
    dx, dy = (s - width) / 2, (s - height) / 2
    return [box[0] * s - dx, box[1] * s - dy, box[2] * s - dx, box[3] * s - dy]


def score_refcoco(questions, answers, ann=None, cfg=None):
    """Acc@IoU>=0.5 of the first [a, b, c, d] in each answer against the box in pixels; no box is wrong."""
    box_space = cfg.box_space if cfg else "square"
    boxes = [parse_box(p) for p in match(questions, answers)]
    hits = [b is not None and box_iou(to_pixels(b, q["width"], q["height"], box_space), q["bbox"]) >= 0.5
            for q, b in zip(questions, boxes)]
    return dict(n=len(hits), acc_iou50=mean(hits), unparseable=mean(b is None for b in boxes), box_space=box_space)

# ---- the files a test server wants (LLaVA's scripts/convert_*_for_submission.py)

def submit_vqav2(questions, answers, data_root):
    """EvalAI's format: [{question_id, answer}] over every test2015 question where LLaVA's
    llava_vqav2_mscoco_test2015.jsonl is at hand (the server wants them all; the ones not asked get "").
    The answers are EvalAIAnswerProcessor's, as LLaVA's scripts/convert_vqav2_for_submission.py writes them."""
    given = {q["question_id"]: evalai_answer(p) for q, p in zip(questions, match(questions, answers))}
    full = os.path.join(data_root, "vqav2", "llava_vqav2_mscoco_test2015.jsonl")
    ids = [r["question_id"] for r in read_jsonl(full, ("question_id",))] if os.path.isfile(full) else list(given)
    return [dict(question_id=i, answer=given.get(i, "")) for i in ids]


def submit_vizwiz(questions, answers, data_root):
    # LLaVA's scripts/convert_vizwiz_for_submission.py
    return [dict(image=q["image"], answer=evalai_answer(p)) for q, p in zip(questions, match(questions, answers))]


# Paths are relative to data_root. annotations: read by `read`; optional where a `submit`ted test split goes to a
# server. mmbench keeps its answers in the question file, RefCOCO its boxes ([x1, y1, x2, y2] in pixels of the
# original image, with its width and height) in the question records.
BENCHMARKS = {
    "pope": dict(questions="pope/llava_pope_test.jsonl", images="pope/val2014", fields=("category",),
                 annotations="pope/coco", read=read_pope, prompt=short_answer, score=score_pope,
                 source="llava_pope_test.jsonl from LLaVA's eval.zip; coco/ from POPE's output/coco (commit "
                        "e3e39262); val2014/ from COCO"),
    "vqav2": dict(questions="vqav2/llava_vqav2_mscoco_test-dev2015.jsonl", images="vqav2/test2015",
                  annotations="vqav2/v2_mscoco_val2014_annotations.json", read=read_vqav2, prompt=short_answer,
                  score=score_vqav2, submit=submit_vqav2,
                  source="question files from LLaVA's eval.zip; test2015/ from COCO; the annotations (optional, "
                         "for a val question file) from visualqa.org"),
    "vizwiz": dict(questions="vizwiz/llava_test.jsonl", images="vizwiz/test", annotations="vizwiz/val.json",
                   read=read_vizwiz, prompt=vizwiz_prompt, score=score_vizwiz, submit=submit_vizwiz,
                   source="llava_test.jsonl from LLaVA's eval.zip; test/ and val.json (optional, for a val question "
                          "file) from vizwiz.org"),
    "textvqa": dict(questions="textvqa/llava_textvqa_val_v051_ocr.jsonl", images="textvqa/train_images",
                    annotations="textvqa/TextVQA_0.5.1_val.json", read=read_textvqa, prompt=short_answer,
                    score=score_textvqa,
                    source="the question file from LLaVA's eval.zip; TextVQA_0.5.1_val.json and train_images/ "
                           "from textvqa.org"),
    "gqa": dict(questions="gqa/llava_gqa_testdev_balanced.jsonl", images="gqa/data/images",
                annotations="gqa/data/testdev_balanced_questions.json", read=read_gqa, prompt=short_answer,
                score=score_gqa, source="the question file from LLaVA's eval.zip; data/ from GQA's download page"),
    "mme": dict(questions="MME/llava_mme.jsonl", images="MME/MME_Benchmark_release_version",
                annotations="MME/MME_Benchmark_release_version", read=read_mme, prompt=short_answer,
                score=score_mme, source="llava_mme.jsonl from LLaVA's eval.zip; MME_Benchmark_release_version/ "
                                        "from MME's authors"),
    "seed": dict(questions="seed_bench/llava-seed-bench.jsonl", images="seed_bench",
                 annotations="seed_bench/SEED-Bench.json", read=read_seed, prompt=multiple_choice, score=score_seed,
                 source="llava-seed-bench.jsonl from LLaVA's eval.zip; SEED-Bench.json, SEED-Bench-image/ and "
                        "SEED-Bench-video-image/ (middle frames) from SEED-Bench"),
    "mmbench": dict(questions="mmbench/mmbench_dev_20230712.tsv", images=None, score=score_mmbench,
                    source="mmbench_dev_20230712.tsv from download.openmmlab.com"),
    "refcoco": dict(questions="refcoco/llava_refcoco_val.jsonl", images="refcoco/train2014",
                    fields=("bbox", "width", "height"), prompt=grounding, score=score_refcoco,
                    source="one {question_id, image, text: the expression, bbox, width, height} a line, made from "
                           "the RefCOCO annotations; train2014/ from COCO"),
}
BENCHMARKS["refcoco+"] = dict(BENCHMARKS["refcoco"], questions="refcoco/llava_refcoco+_val.jsonl")
BENCHMARKS["refcocog"] = dict(BENCHMARKS["refcoco"], questions="refcoco/llava_refcocog_val.jsonl")

# ---- the driver

def check_boxes(questions, path):
    for q in questions:
        where = f"{path}: question {q['question_id']!r}"
        b, w, h = q["bbox"], q["width"], q["height"]
        if not (isinstance(b, list) and len(b) == 4 and all(isinstance(x, (int, float)) for x in b)):
            raise ValueError(f"{where}: field 'bbox' must be [x1, y1, x2, y2] in pixels, got {b!r}")
        if not (isinstance(w, (int, float)) and isinstance(h, (int, float)) and w > 0 and h > 0):
            raise ValueError(f"{where}: fields 'width' and 'height' must be positive numbers, got {w!r}, {h!r}")


def load_benchmark(cfg):
    """cfg.bench's questions, each with its prompt, its annotations and its image folder. A missing file fails here,
    before any model loads."""
    if cfg.bench not in BENCHMARKS:
        raise SystemExit(f"unknown --bench {cfg.bench!r}; choose one of {' '.join(BENCHMARKS)}")
    if not cfg.data_root:
        raise SystemExit("--bench needs --data_root: the folder LLaVA-1.5 calls ./playground/data/eval")
    if cfg.box_space not in ("square", "orig"):
        raise SystemExit(f"--box_space is square or orig, not {cfg.box_space!r}")
    name, spec = cfg.bench, BENCHMARKS[cfg.bench]
    at = lambda rel: os.path.join(cfg.data_root, rel)
    layout = f"{name} in LLaVA-1.5's layout under {cfg.data_root}: {spec['source']}"
    path = cfg.question_file or at(spec["questions"])
    try:
        if path.endswith(".tsv"):
            questions = read_mmbench(path, cfg.circular)
        else:
            questions = llava_questions(path, spec["prompt"], spec.get("fields", ()))
        ann = None
        if "annotations" in spec and (os.path.exists(at(spec["annotations"])) or "submit" not in spec):
            ann = spec["read"](at(spec["annotations"]))
    except FileNotFoundError as e:
        raise SystemExit(f"{name}: missing {e.filename} (expected as {layout})") from None
    if "bbox" in spec.get("fields", ()):
        check_boxes(questions, path)
    questions = questions[:cfg.limit] if cfg.limit > 0 else questions
    folder = cfg.image_folder or (at(spec["images"]) if spec["images"] else "")
    files = sorted({q["image"] for q in questions if isinstance(q["image"], str)})
    missing = [f for f in files if not os.path.isfile(os.path.join(folder, f))]
    if missing:
        raise SystemExit(f"{name}: {len(missing)} of {len(files)} images missing, e.g. "
                         f"{os.path.join(folder, missing[0])} (expected as {layout})")
    return dict(name=name, questions=questions, ann=ann, image_folder=folder)


def check_answers(path, questions, answers, extra_ok=False):
    """Every question answered once, and (unless extra_ok: a --limit run reads a file a longer run wrote) every answer
    one of the questions; else one line naming the file and the first bad id."""
    asked, seen = {answer_key(q) for q in questions}, set()
    for a in answers:
        key = answer_key(a)
        if key in seen:
            raise ValueError(f"{path}: question_id {key[0]} is answered twice")
        if key not in asked and not extra_ok:
            raise ValueError(f"{path}: question_id {key[0]} is not in the question file")
        seen.add(key)
    missing = [q for q in questions if answer_key(q) not in seen]
    if missing:
        raise ValueError(f"{path}: no answer for question_id {missing[0]['question_id']} "
                         f"({len(missing)} of {len(questions)} questions unanswered)")


def read_answers(path):
    """The answers written so far. A last line cut short (the run was killed mid-write) is cut from the file."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        text = f.read()
    if text and not text.endswith("\n"):
        keep = text.rfind("\n") + 1
        print(f"{path}: dropping a last line cut short: {text[keep:][:80]!r}")
        with open(path, "w") as f:
            f.write(text[:keep])
    return read_jsonl(path, ("question_id", "prompt", "text"))


def run_benchmark(model, tokenizer, image_processor, bench, cfg):
    """Answers every question not answered yet in <out>/<bench>/answers.jsonl, appending each as it comes, then
    scores them all into <out>/<bench>/scores.json (and answers_upload.json for a test server)."""
    name, questions, spec = bench["name"], bench["questions"], BENCHMARKS[bench["name"]]
    out = os.path.join(cfg.out or cfg.ckpt, name)
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "answers.jsonl")
    done = {answer_key(a) for a in read_answers(path)}
    todo = [q for q in questions if answer_key(q) not in done]
    print(f"{name}: {len(questions)} questions, {len(questions) - len(todo)} answered before, {len(todo)} to go")
    if todo:
        model.eval()
        with open(path, "a") as f:
            def write(i, text):
                q = todo[i]
                f.write(json.dumps(dict(question_id=q["question_id"], prompt=q["prompt"], text=text)) + "\n")
                f.flush()
            records = [dict(text=q["prompt"], image=q["image"]) for q in todo]
            generate_answers(model, tokenizer, image_processor, records, bench["image_folder"], cfg.batch_size,
                             cfg.max_new_tokens, on_answer=write)
    answers = read_answers(path)
    check_answers(path, questions, answers, extra_ok=cfg.limit > 0)
    scores = spec["score"](questions, answers, bench["ann"], cfg)
    if "submit" in spec:
        with open(os.path.join(out, "answers_upload.json"), "w") as f:
            json.dump(spec["submit"](questions, answers, cfg.data_root), f)
        print(f"wrote {os.path.join(out, 'answers_upload.json')}: submit it to the {name} server")
    with open(os.path.join(out, "scores.json"), "w") as f:
        json.dump(scores, f, indent=2)
    return scores


def flatten(scores, prefix=""):
    for key, value in scores.items():
        if isinstance(value, dict):
            yield from flatten(value, f"{prefix}{key}.")
        else:
            yield prefix + key, value


def format_scores(name, scores):
    rows = [(k, f"{v:.4f}" if isinstance(v, float) else str(v)) for k, v in flatten(scores)]
    width = max([len(name)] + [len(k) for k, _ in rows])
    return "\n".join(f"{k:<{width}}  {v:>10}" for k, v in [(name, "value")] + rows)

# -----------------------------------------------------------------------------

def main(argv):
    cfg, _ = parse_args(EvalConfig, argv)
    print(json.dumps(dataclasses.asdict(cfg), indent=2))
    bench = load_benchmark(cfg) if cfg.bench else None
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer, image_processor, train_cfg = load_model(cfg.ckpt, device=device)
    if bench:
        scores = run_benchmark(model, tokenizer, image_processor, bench, cfg)
        print(format_scores(bench["name"], scores))
        print(f"wrote {os.path.join(cfg.out or cfg.ckpt, bench['name'], 'scores.json')}")
        return
    eval_dir, image_folder = shapes_paths(cfg, train_cfg)
    out_path = cfg.out or os.path.join(cfg.ckpt, "eval.json")
    results = evaluate_shapes(model, tokenizer, image_processor, eval_dir, image_folder, out_path, cfg.batch_size,
                              cfg.max_new_tokens, cfg.limit)
    print(format_table(results))
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main(sys.argv[1:])
