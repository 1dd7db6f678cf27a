"""
R-GAE, the paper's explainability tool (Sec. 3.1 and appendix A): how much each text token of an
answer owes to each visual token (Text-to-Query), each visual token to each image patch (Query-to-Patch), and so
each answer token to each patch (Text-to-Patch).

    python rgae.py --ckpt out/avgpool --image data/shapes/images/eval_00000.png --text "a red circle ..."

For each answer token y_t, teacher forced in one forward pass with eager attention:
  z_t = the logit of y_t at the position p_t that predicts it                                    (Eq. 2's target)
  A_bar = mean over heads of relu(dz_t/dA * A), for every attention map A                         (Eq. 2)
  Text-to-Query: row p_t of prod_l (I + A_bar_l) over the LLM layers, at the M visual positions  (Eq. 3)
  Query-to-Patch: the projector's own map (below)
  Text-to-Patch = Text-to-Query x Query-to-Patch                                                   (Eq. 4)
and each map is averaged over t = 1..L                                                            (Eq. 5)
"""
import dataclasses
import json
import math
import os
import sys
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from tqdm import tqdm

from config import parse_args
from model import IMAGE_TOKEN_INDEX
from projectors import record_attention

# -----------------------------------------------------------------------------
# the rules


def gae_map(grad, A):
    """Eq. 2: [1, heads, Q, K] gradient and attention -> A_bar [Q, K], relu per head then the mean, in fp32."""
    return (grad.float() * A.float()).clamp(min=0).mean(1)[0]


def text_to_query_row(A_bars, p):
    """Eq. 3 for one row: e_p (I + A_bar_L) ... (I + A_bar_1), O(layers * S^2). A_bars first layer first."""
    v = torch.zeros(A_bars[0].shape[0], dtype=torch.float32)
    v[p] = 1.0
    for A_bar in reversed(A_bars):
        v = v + v @ A_bar
    return v


def normalise(R):
    """GAE's normalisation of a self-attention relevance before it meets cross-attention: (R - I) / rowsum + I,
    rows of R - I that sum to zero left as they are (a bare identity stays the identity)."""
    eye = torch.eye(R.shape[0])
    s = (R - eye).sum(-1, keepdim=True)
    return torch.where(s == 0, R, (R - eye) / torch.where(s == 0, 1.0, s) + eye)


def decoder_relevance(maps, N):
    """GAE's decoder rules for M queries reading N patches: maps = [(kind, A_bar)] in layer order, kind "self"
    ([M, M]) or "cross" ([M, N]). Returns R_qi [M, N]."""
    M = maps[0][1].shape[0]
    R_qq, R_qi = torch.eye(M), torch.zeros(M, N)
    for kind, A_bar in maps:
        if kind == "self":
            R_qq, R_qi = R_qq + A_bar @ R_qq, R_qi + A_bar @ R_qi
        else:
            R_qi = R_qi + normalise(R_qq).T @ A_bar
    return R_qi


def pooling_map(N, M):
    """avgpool's Query-to-Patch: the pooling's own linear map, from pooling the identity basis [M, N]."""
    n, m = math.isqrt(N), math.isqrt(M)
    basis = torch.eye(N).view(N, 1, n, n)
    return F.adaptive_avg_pool2d(basis, m).view(N, M).T


def maxpool_map(x, M):
    """Ours (the paper defines none for maxpool): the share of channels whose maximum comes from each patch.
    x [N, C] -> [M, N]."""
    N, C = x.shape
    n, m = math.isqrt(N), math.isqrt(M)
    _, index = F.adaptive_max_pool2d(x.T.reshape(1, C, n, n), m, return_indices=True)  # [1, C, m, m] into n*n
    flat = (index.view(C, M) + torch.arange(M) * N).flatten()  # (token, patch) pairs as one index
    return torch.bincount(flat, minlength=M * N).view(M, N).float() / C


def gradient_times_input(x, visual, grad_visual):
    """Ours for cabstractor (no attention to follow): for each visual token j, relu of the gradient x input on the
    patch features of the target through token j alone, normalised to sum 1. grad_visual: the target's gradient
    with respect to the visual tokens [1, M, d_llm]; x [1, N, C] -> [M, N]."""
    M = visual.shape[1]
    per_token = torch.zeros(M, *visual.shape, dtype=visual.dtype, device=visual.device)  # [M, 1, M, d_llm]
    per_token[torch.arange(M), 0, torch.arange(M)] = grad_visual[0]
    g, = torch.autograd.grad(visual, x, per_token, retain_graph=True, is_grads_batched=True)  # [M, 1, N, C]
    R = (g[:, 0] * x[0]).sum(-1).float().clamp(min=0)  # [M, N]
    s = R.sum(-1, keepdim=True)
    return torch.where(s > 0, R / torch.where(s > 0, s, 1.0), R)

# -----------------------------------------------------------------------------
# one sample


def teacher_forced(model, pixel_values, prompt, answer, features_grad=False):
    """One forward pass over prompt + answer with eager attention. Returns the patch features x [1, N, d_v], the
    visual tokens [1, M, d_llm], the projector's recorded attentions, the LLM output and p, the position of the
    first visual token. The output holds the attentions and only the logits that predict y_1..y_L: logits[0, t]
    comes from the position before y_t (Eq. 2's target; y_t's own position would be an off-by-one)."""
    llm = model.llm
    if llm.config._attn_implementation != "eager":
        llm.set_attn_implementation("eager")  # the attention probabilities are needed
    x = model.patch_features(pixel_values[None]).requires_grad_(features_grad)  # [1, N, d_v]
    with record_attention(model.projector) as attentions:
        visual = model.projector(x)  # [1, N, d_v] -> [1, M, d_llm]
    p = prompt.index(IMAGE_TOKEN_INDEX)
    emb = llm.get_input_embeddings()(torch.tensor(prompt + answer, device=visual.device).clamp(min=0))[None]
    inputs_embeds = torch.cat([emb[:, :p], visual.to(emb.dtype), emb[:, p + 1:]], 1)  # [1, S, d_llm]
    first = len(prompt) - 1 + visual.shape[1]  # where y_1 sits in the spliced sequence
    predicting = torch.arange(first - 1, first - 1 + len(answer), device=visual.device)
    out = llm(inputs_embeds=inputs_embeds, output_attentions=True, logits_to_keep=predicting)  # logits [1, L, V]
    return x, visual, attentions, out, p


def target_grads(out, answer, inputs, targets_per_backward):
    """For t = 1..L, the gradients of z_t = logits[0, t, y_t] with respect to `inputs`. One autograd.grad call per
    target (the reference), or several targets per backward pass through is_grads_batched."""
    k = targets_per_backward
    for start in range(0, len(answer), k):
        ys = answer[start:start + k]
        if k == 1:
            yield torch.autograd.grad(out.logits[0, start, ys[0]], inputs, retain_graph=True)
            continue
        one_hot = torch.zeros(len(ys), *out.logits.shape, device=out.logits.device, dtype=out.logits.dtype)
        for j, y in enumerate(ys):
            one_hot[j, 0, start + j, y] = 1.0
        grads = torch.autograd.grad(out.logits, inputs, one_hot, retain_graph=True, is_grads_batched=True)
        for j in range(len(ys)):
            yield tuple(g[j] for g in grads)


def relevance(model, pixel_values, prompt, answer, per_token=False, targets_per_backward=1):
    """prompt: ids with one IMAGE_TOKEN_INDEX; answer: ids y_1..y_L, teacher forced; pixel_values [3, H, W].
    Returns text_to_query [M], query_to_patch [M, N], text_to_patch [N], each averaged over t (Eq. 5); with
    per_token also text_to_query_t [L, M], query_to_patch_t [L, M, N], text_to_patch_t [L, N].
    targets_per_backward > 1 batches the backward passes (same maps, more memory)."""
    model.eval()
    name = model.projector_name
    x, visual, projector_attentions, out, p = teacher_forced(model, pixel_values, prompt, answer,
                                                             features_grad=name == "cabstractor")
    M, N, L = visual.shape[1], x.shape[1], len(out.attentions)
    first = len(prompt) - 1 + M
    inputs = list(out.attentions) + [A for _, A in projector_attentions] + [visual]
    R_t2q, R_q2i, grad_visual = [], [], torch.zeros_like(visual)
    for t, grads in enumerate(target_grads(out, answer, inputs, targets_per_backward)):
        A_bars = [gae_map(g, A) for g, A in zip(grads[:L], out.attentions)]
        R_t2q.append(text_to_query_row(A_bars, first + t - 1)[p:p + M])  # [M], from the row that predicts y_t
        if name in ("qformer", "dabstractor"):  # dabstractor's deformable map is its cross-attention (ours)
            kinds = ["self" if n.endswith("self") else "cross" for n, _ in projector_attentions]
            R_q2i.append(decoder_relevance([(k, gae_map(g, A)) for k, (_, A), g in
                                            zip(kinds, projector_attentions, grads[L:-1])], N))
        grad_visual = grad_visual + grads[-1]
    if name in FIXED_MAPS:
        R_q2i = [FIXED_MAPS[name](x[0].detach().float(), M)] * len(answer)
    if name == "cabstractor":  # ours: gradient x input of all the answer's targets together, one map per sample
        R_q2i = [gradient_times_input(x, visual, grad_visual)] * len(answer)
    R_t2q, R_q2i = torch.stack(R_t2q).detach(), torch.stack(R_q2i).detach()  # [L, M], [L, M, N]
    maps = dict(text_to_query_t=R_t2q, query_to_patch_t=R_q2i,
                text_to_patch_t=torch.einsum("lm,lmn->ln", R_t2q, R_q2i))  # Eq. 4 for each t
    result = {k[:-2]: v.mean(0) for k, v in maps.items()}  # Eq. 5: the mean of the per-t products
    return {**result, **maps} if per_token else result


# the Query-to-Patch maps that do not depend on the target: x [N, C], M -> [M, N]
FIXED_MAPS = {"linear": lambda x, M: torch.eye(x.shape[0]),
              "avgpool": lambda x, M: pooling_map(x.shape[0], M),
              "maxpool": maxpool_map}


# -----------------------------------------------------------------------------
# the paper's baseline (appendix B): raw attention instead of relevance


def raw_attention(model, pixel_values, prompt, answer):
    """Text-to-Patch from attention alone: the last LLM layer's attention from each predicting position to the M
    visual tokens (mean over heads and t), times the projector's last cross-attention (mean over heads) for
    qformer and dabstractor, its pooling map for avgpool, the identity for linear. [N]; None for the others."""
    name = model.projector_name
    if name not in ("linear", "avgpool", "qformer", "dabstractor"):
        return None
    with torch.no_grad():
        x, visual, attentions, out, p = teacher_forced(model, pixel_values, prompt, answer)
    M, N = visual.shape[1], x.shape[1]
    first = len(prompt) - 1 + M
    rows = out.attentions[-1][0].float().mean(0)[first - 1:first - 1 + len(answer), p:p + M]  # [L, M]
    if name == "linear":
        q2i = torch.eye(N)
    elif name == "avgpool":
        q2i = pooling_map(N, M)
    else:
        q2i = [A for n, A in attentions if not n.endswith("self")][-1][0].float().mean(0)  # [M, N]
    return rows.mean(0) @ q2i

def patches_in_box(box, side):
    """[side*side] bool: the patches whose centre lies in box [x1, y1, x2, y2] (fractions of the square image)."""
    c = (torch.arange(side) + 0.5) / side
    inside_x, inside_y = (c >= box[0]) & (c <= box[2]), (c >= box[1]) & (c <= box[3])
    return (inside_y[:, None] & inside_x[None, :]).flatten()


def relevance_in_box(model, tokenizer, processor, records, image_folder, targets_per_backward=1):
    """The paper's Figure 3 claim as a number: on grounding questions, the share of Text-to-Patch relevance of the
    true box answer (teacher forced) that falls on patches inside that box, averaged; and the share of patches in
    the box, which is what relevance spread evenly would score."""
    from data import IMAGE_TOKEN, load_image, prompt_ids
    shares, areas = [], []
    for r in tqdm(records, desc="relevance in box"):
        pixels = load_image(os.path.join(image_folder, r["image"]), processor, "pad")
        prompt = prompt_ids(tokenizer, IMAGE_TOKEN + "\n" + r["text"])
        answer = tokenizer(r["answer"], add_special_tokens=False)["input_ids"]
        text_to_patch = relevance(model, pixels, prompt, answer, targets_per_backward=targets_per_backward)[
            "text_to_patch"]
        inside = patches_in_box(r["bbox"], math.isqrt(len(text_to_patch)))
        shares.append((text_to_patch[inside].sum() / text_to_patch.sum()).item())
        areas.append(inside.float().mean().item())
    return dict(n=len(records), share_in_box=sum(shares) / len(shares), box_area=sum(areas) / len(areas))

# -----------------------------------------------------------------------------
# Figure 3 of the paper, drawn with pillow


def heat(values, side, size):
    """[side*side] -> an RGB heat map image of size x size (black -> red -> yellow), max-normalised."""
    v = values.reshape(side, side).float()
    v = (v / v.max()).clamp(0, 1) if v.max() > 0 else v
    rgb = torch.stack([(2 * v).clamp(max=1), (2 * v - 1).clamp(min=0), torch.zeros_like(v)], -1)
    return Image.fromarray((rgb * 255).byte().numpy()).resize((size, size), Image.NEAREST)


def figure(image, maps, M, N, text, raw=None, size=160, top=3):
    """Panels: the image; Text-to-Patch over it; Text-to-Query on the sqrt(M) grid; Query-to-Patch of the `top`
    most relevant visual tokens; and the raw-attention baseline when given."""
    n, m = math.isqrt(N), math.isqrt(M)
    image = image.convert("RGB").resize((size, size))
    over = lambda values: Image.blend(image, heat(values, n, size), 0.6)
    best = maps["text_to_query"].argsort(descending=True)[:top].tolist()
    panels = [("image", image), ("Text-to-Patch", over(maps["text_to_patch"])),
              ("Text-to-Query", heat(maps["text_to_query"], m, size))]
    panels += [(f"Query-to-Patch, token {j}", over(maps["query_to_patch"][j])) for j in best]
    if raw is not None:
        panels.append(("raw attention (app. B)", over(raw)))
    canvas = Image.new("RGB", (len(panels) * (size + 8) + 8, size + 48), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (title, panel) in enumerate(panels):
        canvas.paste(panel, (8 + i * (size + 8), 22))
        draw.text((8 + i * (size + 8), 6), title, fill="black")
    draw.text((8, size + 28), f"text: {text}".replace("\n", " ")[:160], fill="black")
    return canvas

# -----------------------------------------------------------------------------
# command line


@dataclass
class RGAEConfig:
    ckpt: str = "out/avgpool"
    image: str = ""  # default: the first held-out image of the checkpoint's shapes world
    question: str = "Describe the image."
    text: str = ""  # the answer to explain; default: the model's own greedy answer to the question
    out: str = ""  # default: <ckpt>/rgae.png (+ rgae.npz with the raw maps)
    raw_attention: bool = False  # add appendix B's raw-attention baseline
    max_new_tokens: int = 32
    inside_box: int = 0  # > 0: instead, score relevance inside the true box on that many held-out grounding questions
    targets_per_backward: int = 8  # answer tokens per batched backward pass; 1 = one autograd.grad call each


def main(argv):
    from data import IMAGE_TOKEN, load_image, prompt_ids
    from model import load_model
    cfg, _ = parse_args(RGAEConfig, argv)
    print(json.dumps(dataclasses.asdict(cfg), indent=2))
    model, tokenizer, processor, train_cfg = load_model(cfg.ckpt, attn_implementation="eager")
    if cfg.inside_box:
        root = train_cfg["shapes_root"]
        with open(os.path.join(root, "eval", "grounding.jsonl")) as f:
            records = [json.loads(line) for line in f][:cfg.inside_box]
        result = relevance_in_box(model, tokenizer, processor, records, os.path.join(root, "images"),
                                  cfg.targets_per_backward)
        print(json.dumps(result))
        with open(os.path.join(cfg.ckpt, "rgae_box.json"), "w") as f:
            json.dump(result, f, indent=2)
        return
    image = cfg.image or os.path.join(train_cfg.get("shapes_root", ""), "images", "eval_00000.png")
    pixels = load_image(image, processor, "pad")
    prompt = prompt_ids(tokenizer, IMAGE_TOKEN + "\n" + cfg.question)
    if cfg.text:
        answer = tokenizer(cfg.text, add_special_tokens=False)["input_ids"]
    else:
        answer = model.generate([prompt], pixels[None], cfg.max_new_tokens, tokenizer.eos_token_id,
                                tokenizer.pad_token_id)[0]
    text = tokenizer.decode(answer)
    print(f"explaining: {text!r}")
    maps = relevance(model, pixels, prompt, answer, per_token=True, targets_per_backward=cfg.targets_per_backward)
    raw = raw_attention(model, pixels, prompt, answer) if cfg.raw_attention else None
    M, N = maps["query_to_patch"].shape
    out = cfg.out or os.path.join(cfg.ckpt, "rgae.png")
    figure(Image.open(image), maps, M, N, text, raw).save(out)
    arrays = {k: v.numpy() for k, v in maps.items()}
    if raw is not None:
        arrays["raw_attention"] = raw.numpy()
    np.savez(os.path.splitext(out)[0] + ".npz", answer_ids=np.array(answer), **arrays)
    print(f"wrote {out} and {os.path.splitext(out)[0]}.npz")


if __name__ == "__main__":
    main(sys.argv[1:])
