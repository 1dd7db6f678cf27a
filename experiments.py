"""
The paper's experiments on the shapes world, one command each. Each trains the runs it needs that are not done yet
(a run is done when its folder holds eval.json), scores them, prints its table as the README shows it, writes the
table to out/paper/<experiment>.md and draws its figure into figures/.

  python experiments.py table1 --seeds 0,1,2   # the six projectors, same data and budget (paper Table 1)
  python experiments.py table2 --seeds 0,1,2   # the spatial tasks (Table 2), from table1's runs
  python experiments.py table3 --seeds 0,1,2   # C-Abstractor against AvgPool in the one-stage recipe (Table 3)
  python experiments.py fig3                   # R-GAE of each projector on one held-out image (Figures 3, 9, 10)
  python experiments.py fig5 --seeds 0,1,2     # stage-1 loss of avgpool, C-Abstractor and QFormer (Figure 5)
  python experiments.py fig6 --seeds 0,1,2     # avgpool from 144 tokens down to 9 (Figure 6)
  python experiments.py fig7 --seeds 0,1,2     # average against max pooling (Figure 7)
  python experiments.py fig8 --seeds 0,1,2     # one stage against two (Figure 8)
  python experiments.py probe --seeds 0        # what the patches and each projector's tokens carry (linear probes)

Runs live in out/paper/seed<S>/<name>; seed S trains on the world of seed S (data/shapes for 0, data/shapes_s<S>
otherwise) with the same shipped stand-ins. `--train_args "..."` is added to every train.py command.
"""
import json
import math
import os
import random
import shlex
import subprocess
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from safetensors import safe_open
from tqdm import tqdm

import rgae
from config import parse_args
from eval import HEADLINE, box_iou, read_jsonl
from model import load_model
from shapes import COLOURS, SHAPES, draw_scene, random_scene
from train import PLOT_COLOURS, moving_average, plot_curves

PROJECTORS = ("linear", "avgpool", "maxpool", "qformer", "cabstractor", "dabstractor")
TASK_NAMES = dict(colour="colour", shape="shape", count="count", existence="existence F1", position="position",
                  relpos="relpos F1", mc="mc", grounding="grounding")


@dataclass
class ExperimentsConfig:
    seeds: str = "0,1,2"  # the worlds (and training seeds) to run; every table shows each seed or the mean over them
    out_dir: str = "out/paper"
    figures: str = "figures"
    train_args: str = ""  # added to every train.py command, e.g. "--epochs 1" for a quick look
    inside_box: int = 300  # grounding questions for R-GAE's relevance inside the box (table1, table2)
    probe_scenes: int = 3000

# -----------------------------------------------------------------------------
# runs: trained when missing, then read


def world_root(seed):
    return "data/shapes" if seed == 0 else f"data/shapes_s{seed}"


def run_dir(cfg, seed, name):
    return os.path.join(cfg.out_dir, f"seed{seed}", name)


def ensure_run(cfg, seed, name, flags):
    """Train and score one run unless its eval.json exists; a run cut short resumes from its last checkpoint."""
    path = run_dir(cfg, seed, name)
    if os.path.isfile(os.path.join(path, "eval.json")):
        return path
    command = [sys.executable, "train.py", *flags, "--seed", str(seed), "--shapes_root", world_root(seed),
               "--out_dir", path, "--resume", *shlex.split(cfg.train_args)]
    print("== " + " ".join(command), flush=True)
    subprocess.run(command, check=True)
    return path


def ensure_box(cfg, path):
    """R-GAE's relevance inside the true box (rgae.py --inside_box) unless rgae_box.json exists."""
    if not os.path.isfile(os.path.join(path, "rgae_box.json")):
        command = [sys.executable, "rgae.py", "--ckpt", path, "--inside_box", str(cfg.inside_box)]
        print("== " + " ".join(command), flush=True)
        subprocess.run(command, check=True)


def projector_runs(cfg, seeds, projectors=PROJECTORS):
    """Table 1's runs: {projector: [run folder of each seed]}, each projector with the shapes world's recipe."""
    return {p: [ensure_run(cfg, s, p, ["--projector", p]) for s in seeds] for p in projectors}


def read_run(path):
    """{task: headline value in %} of a run's eval.json, plus its projector, M, trainable projector parameters and,
    where rgae.py wrote rgae_box.json, the share of relevance inside the box."""
    with open(os.path.join(path, "eval.json")) as f:
        row = {t: 100 * m[HEADLINE[t]] for t, m in json.load(f).items()}
    with open(os.path.join(path, "ckpt", "config.json")) as f:
        train_cfg = json.load(f)
    with safe_open(os.path.join(path, "ckpt", "model.safetensors"), "pt") as f:
        params = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys() if k.startswith("projector."))
    box = os.path.join(path, "rgae_box.json")
    if os.path.isfile(box):
        with open(box) as f:
            row["in box"] = 100 * json.load(f)["share_in_box"]
    return dict(row, projector=train_cfg["projector"], M=train_cfg["num_tokens"], params=params)

# -----------------------------------------------------------------------------
# tables and figures


def spread(values):
    """The mean and, over several seeds, the lowest and highest: '94.0 (91.3-96.3)'."""
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{sum(values) / len(values):.1f} ({min(values):.1f}-{max(values):.1f})"


def markdown(header, rows):
    return "\n".join(["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)] +
                     ["| " + " | ".join(map(str, r)) + " |" for r in rows])


def mean_table(named_runs, columns):
    """A row per name: projector, M, trainable projector parameters, seeds, then each column's spread over the
    name's runs (one per seed)."""
    rows = []
    for name, paths in named_runs.items():
        runs = [read_run(p) for p in paths]
        cells = [spread([r[c] for r in runs if c in r]) for c in columns]
        rows.append([name, runs[0]["M"], f"{runs[0]['params']:,}", len(runs), *cells])
    return markdown(["run", "M", "projector params", "seeds", *[TASK_NAMES.get(c, c) for c in columns]], rows)


def seed_table(pairs, seeds, labels):
    """Two runs side by side in each seed, then their difference per seed: the figures that compare two recipes."""
    rows = []
    for s, (a, b) in zip(seeds, pairs):
        ra, rb = read_run(a), read_run(b)
        rows += [[labels[0], s] + [f"{ra[t]:.1f}" for t in HEADLINE], [labels[1], s] + [f"{rb[t]:.1f}" for t in HEADLINE]]
    diffs = [[read_run(a)[t] - read_run(b)[t] for a, b in pairs] for t in HEADLINE]
    rows.append([f"{labels[0]} - {labels[1]}", " / ".join(map(str, seeds))] +
                [" / ".join(f"{d:+.1f}" for d in ds) for ds in diffs])
    return markdown(["", "seed", *[TASK_NAMES[t] for t in HEADLINE]], rows)


def plot_bars(runs, names, path, size=(720, 360)):
    """Each task's headline metric as a group of bars, one bar per run, drawn with pillow. -> {name: {task: %}}"""
    scores = {name: {t: v for t, v in read_run(r).items() if t in HEADLINE} for r, name in zip(runs, names)}
    tasks = [t for t in HEADLINE if any(t in v for v in scores.values())]
    W, H, pad = size[0], size[1], 40
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    draw.line([(pad, H - pad), (W - 10, H - pad)], fill="black")
    group = (W - 10 - pad) / len(tasks)
    bar = group * 0.8 / len(runs)
    for j, task in enumerate(tasks):
        x0 = pad + j * group + group * 0.1
        draw.text((x0, H - pad + 6), task, fill="black")
        for k, name in enumerate(names):
            v = scores[name].get(task)
            if v is not None:
                top = H - pad - (H - pad - 40) * v / 100
                draw.rectangle([x0 + k * bar, top, x0 + (k + 1) * bar - 2, H - pad],
                               fill=PLOT_COLOURS[k % len(PLOT_COLOURS)])
    for k, name in enumerate(names):
        draw.text((pad + 170 * (k % 4), 4 + 12 * (k // 4)), name, fill=PLOT_COLOURS[k % len(PLOT_COLOURS)])
    draw.text((4, 36), "100%", fill="black")
    draw.text((4, H - pad - 10), "0%", fill="black")
    image.save(path)
    return scores


def position_by_objects(root, path):
    """Position accuracy split by how many objects the image holds (from the count file's answers): with one object
    "where is it" is localisation alone, with more it also needs the right object. -> {objects: (correct, n)}"""
    n_of = {r["image"]: int(r["answer"]) for r in read_jsonl(os.path.join(root, "eval", "count.jsonl"))}
    said = {r["question_id"]: r["text"] for r in read_jsonl(os.path.join(path, "answers_position.jsonl"))}
    by = {}
    for r in read_jsonl(os.path.join(root, "eval", "position.jsonl")):
        right, n = by.get(n_of[r["image"]], (0, 0))
        by[n_of[r["image"]]] = (right + (said[r["question_id"]].strip().lower().rstrip(".") == r["answer"]), n + 1)
    return dict(sorted(by.items()))


def yes_share(path):
    with open(os.path.join(path, "eval.json")) as f:
        return 100 * json.load(f)["relpos"]["yes_ratio"]


def threshold_step(losses, below=0.4, smooth=20):
    """The first step whose moving average falls below `below` (None if none), and the final moving average."""
    avg = moving_average(losses, smooth)
    return next((i + 1 for i, v in enumerate(avg) if v < below), None), avg[-1]

# -----------------------------------------------------------------------------
# the experiments


def table1(cfg, seeds):
    runs = projector_runs(cfg, seeds)
    for paths in runs.values():
        for p in paths:
            ensure_box(cfg, p)
    return mean_table(runs, [*HEADLINE, "in box"])


def table2(cfg, seeds):
    runs = projector_runs(cfg, seeds)
    rows = []
    for p, paths in runs.items():
        for p_run in paths:
            ensure_box(cfg, p_run)
        split = [position_by_objects(world_root(s), r) for s, r in zip(seeds, paths)]
        cells = [" / ".join(f"{100 * b[k][0] / b[k][1]:.1f}" for b in split) for k in (1, 2, 3)]
        per_seed = lambda f: " / ".join(f"{f(r):.1f}" for r in paths)
        rows.append([p, read_run(paths[0])["M"], per_seed(lambda r: read_run(r)["position"]), *cells,
                     per_seed(lambda r: read_run(r)["relpos"]), per_seed(yes_share),
                     per_seed(lambda r: read_run(r)["grounding"]), per_seed(lambda r: read_run(r)["in box"])])
    return markdown(["projector", "M", "position", "1 object", "2 objects", "3 objects", "relpos F1",
                     'relpos "yes" share', "grounding", "relevance in box"], rows)


def table3(cfg, seeds):
    runs = {f"onestage {p}": [ensure_run(cfg, s, f"onestage_{p}", ["--projector", p, "--stage", "onestage"])
                              for s in seeds] for p in ("avgpool", "cabstractor")}
    return mean_table(runs, list(HEADLINE))


def fig3(cfg, seeds):
    seed = seeds[0]
    record = read_jsonl(os.path.join(world_root(seed), "eval", "grounding.jsonl"))[0]
    image = os.path.join(world_root(seed), "images", record["image"])
    lines = []
    for p, (path,) in projector_runs(cfg, [seed]).items():
        out = os.path.join(cfg.figures, f"rgae_{p}.png")
        rgae.main(["--ckpt", path, "--image", image, "--question", record["text"], "--text", record["answer"],
                   "--raw_attention", "--out", out])
        lines.append(f"| {p} | ![]({out}) |")
    return "\n".join([f"{record['text']!r} -> {record['answer']} ({image})", "", "| projector | R-GAE |",
                      "| --- | --- |", *lines])


def fig5(cfg, seeds):
    names = ("avgpool", "cabstractor", "qformer")
    runs = projector_runs(cfg, seeds, names)
    logs = {p: [os.path.join(r, "pretrain", "log.jsonl") for r in paths] for p, paths in runs.items()}
    plot_curves([v[0] for v in logs.values()], names, os.path.join(cfg.figures, "fig5_stage1_loss.png"))
    rows = []
    for p, paths in logs.items():
        found = [threshold_step([r["loss"] for r in read_jsonl(log, ("loss",))]) for log in paths]
        rows.append([p, " / ".join(str(step) for step, _ in found), " / ".join(f"{v:.3f}" for _, v in found)])
    return markdown(["projector", f"step where the 20-step moving average first falls below 0.4, seed "
                     f"{' / '.join(map(str, seeds))}", "final moving average"], rows)


def fig6(cfg, seeds):
    runs = projector_runs(cfg, seeds, ("linear",))
    for m in (100, 64, 36, 16):
        runs[f"avgpool M={m}"] = [ensure_run(cfg, s, f"avgpool_m{m}", ["--projector", "avgpool", "--num_tokens",
                                                                     str(m)]) for s in seeds]
    runs.update(projector_runs(cfg, seeds, ("avgpool",)))
    plot_bars([v[0] for v in runs.values()], list(runs), os.path.join(cfg.figures, "fig6_sweep.png"))
    return mean_table(runs, list(HEADLINE))


def fig7(cfg, seeds):
    runs = projector_runs(cfg, seeds, ("avgpool", "maxpool"))
    pairs = list(zip(runs["avgpool"], runs["maxpool"]))
    plot_bars([r for pair in pairs for r in pair], [f"{k} seed {s}" for s in seeds for k in ("average", "max")],
              os.path.join(cfg.figures, "fig7_avg_max.png"))
    return seed_table(pairs, seeds, ("average", "max"))


def fig8(cfg, seeds):
    two = projector_runs(cfg, seeds, ("avgpool",))["avgpool"]
    one = [ensure_run(cfg, s, "onestage_avgpool", ["--projector", "avgpool", "--stage", "onestage"]) for s in seeds]
    pairs = list(zip(two, one))
    plot_bars([r for pair in pairs for r in pair], [f"{k} seed {s}" for s in seeds for k in ("two", "one")],
              os.path.join(cfg.figures, "fig8_stages.png"))
    return seed_table(pairs, seeds, ("two stages", "one stage"))


def probe(cfg, seeds):
    rows = []
    for seed in seeds:
        with open(os.path.join(world_root(seed), "settings.json")) as f:
            world = json.load(f)
        for p, (path,) in projector_runs(cfg, [seed]).items():
            model, _, image_processor, _ = load_model(path)
            r = probe_model(model, image_processor, cfg.probe_scenes, seed, world["image_size"], world["max_objects"])
            with open(os.path.join(path, "probe.json"), "w") as f:
                json.dump(r, f, indent=2)
            for what in (("patches", "tokens") if p == "avgpool" else ("tokens",)):
                x = r[what]
                rows.append([seed, "tower's patches" if what == "patches" else f"{p} tokens",
                             *(f"{100 * x[k]:.1f}" for k in PROBE_CLASSES)])
        rows.append([seed, "the mean box of the right cell (grounding Acc@0.5)", "", "", f"{100 * r['cell_box_iou50']:.1f}"])
    return markdown(["seed", "features", "cells' shape", "cells' colour", "each shape's colour"], rows)


EXPERIMENTS = dict(table1=table1, table2=table2, table3=table3, fig3=fig3, fig5=fig5, fig6=fig6, fig7=fig7, fig8=fig8,
                   probe=probe)

# -----------------------------------------------------------------------------
# what the visual tokens carry: linear probes on fresh scenes of the world


def probe_scenes(image_processor, n, seed, image_size=96, max_objects=3):
    """n new scenes of the world (a seed of their own, so none is a training image) -> pixel_values [n, 3, H, W]
    and labels: each 3x3 cell's shape [n, 9] and colour [n, 9] (the last class: an empty cell), each shape's colour
    [n, 4] (the last class: the shape is absent), each cell's box [n, 9, 4] (zeros where empty)."""
    rng = random.Random(f"shapes-{seed}-probe")
    colours = sorted(COLOURS)
    pixels, shape, colour = [], torch.full((n, 9), len(SHAPES)), torch.full((n, 9), len(colours))
    colour_of_shape, box = torch.full((n, len(SHAPES)), len(colours)), torch.zeros(n, 9, 4)
    for i in range(n):
        objects = random_scene(rng, image_size, max_objects)
        pixels.append(image_processor(images=draw_scene(objects, image_size), return_tensors="pt")["pixel_values"])
        for o in objects:
            s, c = SHAPES.index(o["shape"]), colours.index(o["colour"])
            shape[i, o["cell"]], colour[i, o["cell"]], colour_of_shape[i, s] = s, c, c
            box[i, o["cell"]] = torch.tensor(o["box"])
    return torch.cat(pixels), dict(shape=shape, colour=colour, colour_of_shape=colour_of_shape, box=box)


# the probed labels and their class counts, the last class meaning none (an empty cell, an absent shape)
PROBE_CLASSES = dict(shape=len(SHAPES) + 1, colour=len(COLOURS) + 1, colour_of_shape=len(COLOURS) + 1)


def linear_probe(features, labels, steps=1000, lr=1e-3, weight_decay=1e-2, held_out=0.2):
    """One Linear over the flattened features [n, K, D] -> every label of PROBE_CLASSES (cross-entropy), trained on
    the first 80% of the scenes. Returns each label's held-out accuracy where it is not none: the cells' shape and
    colour need to know where the objects are; the colour of each shape (the answer to "what colour is the
    circle?") does not."""
    x = features.flatten(1).float()
    n, n_train = len(x), int(len(x) * (1 - held_out))
    x = (x - x[:n_train].mean(0)) / (x[:n_train].std(0) + 1e-5)
    sizes = [labels[k].shape[1] * c for k, c in PROBE_CLASSES.items()]
    head = torch.nn.Linear(x.shape[1], sum(sizes))
    torch.nn.init.zeros_(head.weight)  # a convex problem: start at zero, so the same features give the same probe
    torch.nn.init.zeros_(head.bias)
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)

    def logits(rows):  # {label: [rows, k, classes]}
        parts = head(x[rows]).split(sizes, -1)
        return {k: p.view(len(rows), -1, c) for (k, c), p in zip(PROBE_CLASSES.items(), parts)}
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        rows = torch.randint(n_train, (min(256, n_train),), generator=g)
        loss = sum(F.cross_entropy(z.flatten(0, 1), labels[k][rows].flatten()) for k, z in logits(rows).items())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    test = torch.arange(n_train, n)
    with torch.no_grad():
        out = logits(test)
    scores = {}
    for k, c in PROBE_CLASSES.items():
        truth = labels[k][test]
        scores[k] = (out[k].argmax(-1) == truth)[truth < c - 1].float().mean().item()
    return dict(n_cells=int((labels["shape"][test] < len(SHAPES)).sum()), **scores)


def cell_box_baseline(labels, held_out=0.2):
    """Acc@IoU>=0.5 of answering every grounding question with the mean box of the object's cell (over the first 80%
    of the scenes): what naming the right cell alone scores."""
    box, occupied = labels["box"], labels["shape"] < len(SHAPES)
    n_train = int(len(box) * (1 - held_out))
    mean_box = (box[:n_train] * occupied[:n_train, :, None]).sum(0) / occupied[:n_train].sum(0).clamp(min=1)[:, None]
    hits = [box_iou(mean_box[c].tolist(), box[i, c].tolist()) >= 0.5
            for i in range(n_train, len(box)) for c in range(9) if occupied[i, c]]
    return sum(hits) / len(hits)


def probe_model(model, image_processor, n=3000, seed=0, image_size=96, max_objects=3, batch_size=100):
    """Linear probes of what the frozen tower's patch features [N, d_v] and the projector's visual tokens
    [M, d_llm] carry about each cell of n fresh scenes, and the grounding score of naming the right cell."""
    pixel_values, labels = probe_scenes(image_processor, n, seed, image_size, max_objects)
    device = next(model.projector.parameters()).device
    patches, tokens = [], []
    with torch.no_grad():
        for start in tqdm(range(0, n, batch_size), desc="probe features", unit="batch"):
            x = model.patch_features(pixel_values[start:start + batch_size].to(device))  # [b, N, d_v]
            patches.append(x.cpu())
            tokens.append(model.projector(x).cpu())  # [b, M, d_llm]
    return dict(patches=linear_probe(torch.cat(patches), labels), tokens=linear_probe(torch.cat(tokens), labels),
                cell_box_iou50=cell_box_baseline(labels))

# -----------------------------------------------------------------------------


def main(argv):
    if not argv or argv[0] not in EXPERIMENTS:
        raise SystemExit(f"usage: python experiments.py {{{','.join(EXPERIMENTS)}}} [--seeds 0,1,2] [--train_args ...]")
    cfg, _ = parse_args(ExperimentsConfig, argv[1:])
    seeds = [int(s) for s in cfg.seeds.split(",")]
    os.makedirs(cfg.figures, exist_ok=True)
    table = EXPERIMENTS[argv[0]](cfg, seeds)
    os.makedirs(cfg.out_dir, exist_ok=True)
    path = os.path.join(cfg.out_dir, f"{argv[0]}.md")
    with open(path, "w") as f:
        f.write(f"python experiments.py {' '.join(argv)}\n\n{table}\n")
    print(table)
    print(f"wrote {path}")


if __name__ == "__main__":
    main(sys.argv[1:])
