"""Value informativeness: how much of a pair's content can be read back from its value.

Informativeness is measured, not assumed. Every probe is fitted on
the values of one set of pairs and scored on the values of other (held-out) pairs, and
the number that matters is the trained compressor against the same compressor at its
random initialisation (same seed, untrained).

Probes:

* ``attribute_probe`` (when samples carry ground-truth ``attributes``, as the demo data
  does): closed-form ridge regression from standardised flattened values (N, 32*96) to
  the one-hot codes of every attribute; score = argmax accuracy per attribute, averaged.
* ``caption_probe`` (any captions): ridge from standardised values to the bag of the
  ``top_k`` most frequent caption words; score = mean per-word ROC AUC on the test
  pairs (0.5 = chance, 1 = perfect), over words that occur and are absent in the test set.
* ``connector_probe``: how values are used downstream. A small MLP applied to each of the
  32 latent tokens (raw values, no standardisation, as the VLM's RAG connector reads
  them), then a linear read-out over the concatenated token outputs (the LLM sees every
  token at its own position), trained with AdamW on the attributes; argmax accuracy.
* ``caption_recovery_probe``: ridge from the values to the caption's word at each of its
  first 16 positions; word accuracy and the share of captions read back exactly. Word
  order counts here, so it separates values that keep the caption from values that keep
  a pooled bag of its words (what a random Perceiver's near-uniform attention gives).
* ``knn_attribute_probe`` / ``knn_caption_probe``: no fitting at all; the 10 nearest
  training values by cosine vote (the k-NN evaluation of self-supervised learning).
* ``value_spread``: mean cosine similarity between the raw values of different pairs; the
  reference code's random Perceiver gave values that are nearly identical (close to 1).
  ``token_redundancy``: the same between the 32 latent tokens of one value.

``informativeness`` runs them all and rounds values to fp16 first, as the bank stores them.

The ridge strength is chosen from a fixed grid on a seeded validation slice of the train
split, for every set of values alike. numpy + torch only.
"""

from __future__ import annotations

import re
from collections import Counter

import numpy as np
import torch
from torch import nn

_ALPHAS = (1e-2, 1e-1, 1.0, 10.0, 100.0, 1e3, 1e4)
_WORD = re.compile(r"[a-z]+")


def _flat(values) -> np.ndarray:
    return np.asarray(values, dtype=np.float64).reshape(len(values), -1)


def _standardise(train: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean, std = train.mean(0), train.std(0)
    std = np.where(std > 1e-12 * max(1.0, float(np.abs(mean).max())), std, 1.0)
    return (train - mean) / std, (test - mean) / std


def _ridge_predict(xtr: np.ndarray, ytr: np.ndarray, xte: np.ndarray, alphas) -> list[np.ndarray]:
    """Kernel-form ridge (cheap when N < D): predictions on xte for each alpha (scaled by D)."""
    ymean = ytr.mean(0)
    evals, evecs = np.linalg.eigh(xtr @ xtr.T)
    proj = evecs.T @ (ytr - ymean)
    cross = xte @ xtr.T @ evecs
    d = xtr.shape[1]
    return [ymean + cross @ (proj / (evals + a * d)[:, None]) for a in alphas]


def ridge_fit_predict(
    train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, score, seed: int = 0
) -> np.ndarray:
    """Standardise, pick alpha on a validation slice (by ``score``), refit, predict test."""
    xtr, xte = _standardise(_flat(train_x), _flat(test_x))
    ytr = np.asarray(train_y, dtype=np.float64)
    perm = np.random.default_rng(seed).permutation(len(xtr))
    n_val = max(1, len(xtr) // 5)
    val, fit = perm[:n_val], perm[n_val:]
    preds = _ridge_predict(xtr[fit], ytr[fit], xtr[val], _ALPHAS)
    best = int(np.argmax([score(p, ytr[val]) for p in preds]))
    return _ridge_predict(xtr, ytr, xte, [_ALPHAS[best]])[0]


def _attribute_targets(
    train_attrs: list[dict], test_attrs: list[dict]
) -> dict[str, tuple[np.ndarray, np.ndarray, int]]:
    """name -> (train labels, test labels, classes), classes numbered from the train split."""
    out = {}
    for name in sorted(train_attrs[0]):
        classes = sorted({str(a[name]) for a in train_attrs})
        index = {c: i for i, c in enumerate(classes)}
        tr = np.array([index[str(a[name])] for a in train_attrs])
        te = np.array([index.get(str(a[name]), -1) for a in test_attrs])
        out[name] = (tr, te, len(classes))
    return out


def _grouped_accuracy(pred: np.ndarray, labels: list[np.ndarray], sizes: list[int]) -> list[float]:
    accs, start = [], 0
    for lab, k in zip(labels, sizes, strict=False):
        accs.append(float((pred[:, start : start + k].argmax(1) == lab).mean()))
        start += k
    return accs


def attribute_probe(
    train_values,
    train_attributes: list[dict],
    test_values,
    test_attributes: list[dict],
    seed: int = 0,
) -> dict:
    """Ridge attribute probe: {"mean_accuracy", "accuracy": {attr: acc}, "chance": {...}}."""
    targets = _attribute_targets(train_attributes, test_attributes)
    names = list(targets)
    sizes = [targets[n][2] for n in names]
    ytr = np.concatenate([np.eye(targets[n][2])[targets[n][0]] for n in names], 1)
    tr_labels = [targets[n][0] for n in names]

    def score(pred, y):  # mean accuracy on the validation slice; labels recovered from y
        labels = [
            y[:, s : s + k].argmax(1) for s, k in zip(np.cumsum([0] + sizes), sizes, strict=False)
        ]
        return float(np.mean(_grouped_accuracy(pred, labels, sizes)))

    pred = ridge_fit_predict(train_values, ytr, test_values, score, seed)
    accs = _grouped_accuracy(pred, [targets[n][1] for n in names], sizes)
    chance = {
        n: float((targets[n][1] == np.bincount(lab).argmax()).mean())
        for n, lab in zip(names, tr_labels, strict=False)
    }
    return {
        "mean_accuracy": float(np.mean(accs)),
        "accuracy": dict(zip(names, accs, strict=False)),
        "chance": chance,
        "mean_chance": float(np.mean(list(chance.values()))),
    }


def caption_words(captions: list[str], top_k: int) -> list[str]:
    """The ``top_k`` words in the most captions (ties broken alphabetically)."""
    df = Counter(w for c in captions for w in set(_WORD.findall(c.lower())))
    return [w for w, _ in sorted(df.items(), key=lambda kv: (-kv[1], kv[0]))[:top_k]]


def bag_of_words(captions: list[str], words: list[str]) -> np.ndarray:
    index = {w: i for i, w in enumerate(words)}
    y = np.zeros((len(captions), len(words)))
    for r, c in enumerate(captions):
        for w in set(_WORD.findall(c.lower())):
            if w in index:
                y[r, index[w]] = 1.0
    return y


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Mann-Whitney ROC AUC with ties counted half; nan when only one class is present."""
    labels = labels.astype(bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    ranks = (np.cumsum(counts) - (counts - 1) / 2.0)[inverse]  # average 1-based ranks
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def mean_auc(pred: np.ndarray, y: np.ndarray) -> float:
    aucs = [roc_auc(pred[:, j], y[:, j]) for j in range(y.shape[1])]
    aucs = [a for a in aucs if a == a]
    return float(np.mean(aucs)) if aucs else float("nan")


def caption_probe(
    train_values,
    train_captions: list[str],
    test_values,
    test_captions: list[str],
    top_k: int = 50,
    seed: int = 0,
) -> float:
    """Ridge bag-of-words probe; mean per-word ROC AUC on the test pairs."""
    words = caption_words(train_captions, top_k)
    ytr, yte = bag_of_words(train_captions, words), bag_of_words(test_captions, words)
    pred = ridge_fit_predict(train_values, ytr, test_values, mean_auc, seed)
    return mean_auc(pred, yte)


def knn_neighbours(train_values, test_values, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """(indices (n_test, k), cosine similarities (n_test, k)) of each test value's ``k``
    nearest training values, by cosine on the raw flattened values (no fitting)."""
    tr, te = _flat(train_values), _flat(test_values)
    tr = tr / np.maximum(np.linalg.norm(tr, axis=1, keepdims=True), 1e-12)
    te = te / np.maximum(np.linalg.norm(te, axis=1, keepdims=True), 1e-12)
    sim = te @ tr.T
    k = min(k, sim.shape[1])
    idx = np.argsort(-sim, axis=1, kind="stable")[:, :k]
    return idx, np.take_along_axis(sim, idx, 1)


def knn_attribute_probe(
    train_values, train_attributes: list[dict], test_values, test_attributes: list[dict], k=10
) -> dict:
    """k-NN attribute probe: each attribute by majority vote of the ``k`` nearest training
    values; {"mean_accuracy", "accuracy": {attr: acc}, "exact": all attributes right}."""
    targets = _attribute_targets(train_attributes, test_attributes)
    idx, _ = knn_neighbours(train_values, test_values, k)
    right = []
    for _name, (tr, te, classes) in targets.items():
        votes = np.stack([np.bincount(row, minlength=classes) for row in tr[idx]])
        right.append(votes.argmax(1) == te)  # ties: the lowest class, deterministic
    right = np.stack(right, 1)
    return {
        "mean_accuracy": float(right.mean()),
        "accuracy": dict(zip(targets, right.mean(0).tolist(), strict=True)),
        "exact": float(right.all(1).mean()),
    }


def knn_caption_probe(
    train_values, train_captions: list[str], test_values, test_captions: list[str], k=10
) -> float:
    """k-NN caption probe: a word's score = the share of the ``k`` nearest training pairs
    whose caption has it; mean per-word ROC AUC on the test pairs (as ``caption_probe``)."""
    words = caption_words(train_captions, 50)
    ytr, yte = bag_of_words(train_captions, words), bag_of_words(test_captions, words)
    idx, _ = knn_neighbours(train_values, test_values, k)
    return mean_auc(ytr[idx].mean(1), yte)


CAPTION_POSITIONS = 16  # words of a caption the recovery probe reads back


def caption_recovery_probe(
    train_values, train_captions: list[str], test_values, test_captions: list[str], seed=0
) -> dict:
    """Ridge from the value to the caption's word at each of the first 16 positions (one-hot
    over the training vocabulary, plus end-of-caption); order matters, unlike a bag of
    words. {"word_accuracy": per position, "exact": share of captions read back whole}."""
    vocab = sorted({w for c in train_captions for w in _WORD.findall(c.lower())})
    index = {w: i for i, w in enumerate(vocab)}
    width = len(vocab) + 2  # + end of caption, + out of vocabulary

    def targets(captions: list[str]) -> np.ndarray:
        y = np.zeros((len(captions), CAPTION_POSITIONS, width))
        for r, c in enumerate(captions):
            words = _WORD.findall(c.lower())[:CAPTION_POSITIONS]
            for t in range(CAPTION_POSITIONS):
                y[r, t, index.get(words[t], width - 1) if t < len(words) else width - 2] = 1
        return y.reshape(len(captions), -1)

    def read(pred: np.ndarray) -> np.ndarray:
        return pred.reshape(len(pred), CAPTION_POSITIONS, width).argmax(-1)

    ytr, yte = targets(train_captions), targets(test_captions)
    pred = ridge_fit_predict(
        train_values, ytr, test_values, lambda p, y: float((read(p) == read(y)).mean()), seed
    )
    right = read(pred) == read(yte)
    return {"word_accuracy": float(right.mean()), "exact": float(right.all(1).mean())}


def _mean_offdiagonal_cosine(x: np.ndarray) -> np.ndarray:
    """x (..., n, d) -> mean cosine similarity between distinct rows, per leading index."""
    x = x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
    sim = x @ np.swapaxes(x, -1, -2)
    n = x.shape[-2]
    return (sim.sum((-1, -2)) - np.trace(sim, axis1=-2, axis2=-1)) / max(1, n * (n - 1))


def value_spread(values, max_rows: int = 1000) -> float:
    """Mean cosine similarity between the flattened raw values of distinct pairs."""
    return float(_mean_offdiagonal_cosine(_flat(values)[:max_rows]))


def token_redundancy(values) -> float:
    """Mean cosine similarity between the latent tokens of one value (1 = 32 copies)."""
    return float(_mean_offdiagonal_cosine(np.asarray(values, dtype=np.float64)).mean())


class _TokenConnector(nn.Module):
    """Per-latent-token MLP, then a linear read-out over the concatenated tokens (the LLM
    sees each token at its own position, so which latent says what is not lost)."""

    def __init__(self, tokens: int, d_in: int, d_out: int, width: int = 128, d_token: int = 32):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(d_in, width), nn.GELU(), nn.Linear(width, d_token))
        self.head = nn.Linear(tokens * d_token, d_out)

    def forward(self, values: torch.Tensor) -> torch.Tensor:  # (B, L, d) -> (B, d_out)
        return self.head(self.mlp(values).flatten(1))


def connector_probe(
    train_values,
    train_attributes: list[dict],
    test_values,
    test_attributes: list[dict],
    epochs: int = 20,
    lr: float = 1e-3,
    seed: int = 0,
) -> dict:
    """Attribute accuracy of a small per-token MLP connector trained on raw values."""
    targets = _attribute_targets(train_attributes, test_attributes)
    names = list(targets)
    sizes = [targets[n][2] for n in names]
    xtr = torch.as_tensor(np.asarray(train_values, dtype=np.float32))
    xte = torch.as_tensor(np.asarray(test_values, dtype=np.float32))
    ytr = torch.as_tensor(np.stack([targets[n][0] for n in names], 1))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _TokenConnector(xtr.shape[1], xtr.shape[-1], sum(sizes))
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
        for _ in range(epochs):
            for idx in torch.randperm(len(xtr)).split(64):
                logits = model(xtr[idx]).split(sizes, dim=1)
                loss = sum(
                    nn.functional.cross_entropy(lg, ytr[idx, j]) for j, lg in enumerate(logits)
                )
                opt.zero_grad()
                loss.backward()
                opt.step()
    with torch.no_grad():
        pred = model(xte).numpy()
    accs = _grouped_accuracy(pred, [targets[n][1] for n in names], sizes)
    return {"mean_accuracy": float(np.mean(accs)), "accuracy": dict(zip(names, accs, strict=False))}


def informativeness(
    values: dict[str, tuple[np.ndarray, np.ndarray]],
    train_captions: list[str],
    test_captions: list[str],
    train_attributes: list[dict] | None = None,
    test_attributes: list[dict] | None = None,
    seed: int = 0,
) -> dict:
    """Every probe on every set of values: ``values[name] = (train values, test values)``.

    Attribute probes run only when every sample has attributes with the same names.
    """
    have_attrs = (
        train_attributes is not None
        and test_attributes is not None
        and all(a is not None for a in train_attributes + test_attributes)
        and len({tuple(sorted(a)) for a in train_attributes + test_attributes}) == 1
    )
    out: dict = {"train_pairs": len(train_captions), "test_pairs": len(test_captions)}
    for name, (train, test) in values.items():
        train, test = (np.asarray(v).astype(np.float16).astype(np.float32) for v in (train, test))
        r = {
            "caption_word_auc": caption_probe(
                train, train_captions, test, test_captions, seed=seed
            ),
            "caption_word_auc_knn": knn_caption_probe(train, train_captions, test, test_captions),
            "caption_recovery": caption_recovery_probe(
                train, train_captions, test, test_captions, seed
            ),
            "value_cosine": value_spread(test),
            "token_cosine": token_redundancy(test),
        }
        if have_attrs:
            ridge = attribute_probe(train, train_attributes, test, test_attributes, seed)
            conn = connector_probe(train, train_attributes, test, test_attributes, seed=seed)
            knn = knn_attribute_probe(train, train_attributes, test, test_attributes)
            r["attribute_knn"] = knn["mean_accuracy"]
            r["attribute_knn_exact"] = knn["exact"]
            r["attribute_knn_per_attribute"] = knn["accuracy"]
            r["attribute_ridge"] = ridge["mean_accuracy"]
            r["attribute_ridge_per_attribute"] = ridge["accuracy"]
            r["attribute_connector"] = conn["mean_accuracy"]
            r["attribute_connector_per_attribute"] = conn["accuracy"]
            out["attribute_chance"] = ridge["mean_chance"]
        out[name] = r
    return out


def format_informativeness(report: dict) -> str:
    """A few readable lines comparing the value sets of an ``informativeness`` report."""
    if not report or "skipped" in report:
        return f"informativeness: {report.get('skipped', 'not measured') if report else 'n/a'}"
    lines = [
        f"informativeness on {report['test_pairs']} held-out pairs "
        f"(probes fitted on {report['train_pairs']}):"
    ]
    for name, r in report.items():
        if not isinstance(r, dict):
            continue
        line = (
            f"  {name:>12}: caption read back exactly {r['caption_recovery']['exact']:.3f} "
            f"(words {r['caption_recovery']['word_accuracy']:.3f}), "
            f"caption-word AUC {r['caption_word_auc']:.3f}"
        )
        if "attribute_ridge" in r:
            line += (
                f", attribute acc ridge {r['attribute_ridge']:.3f} / connector "
                f"{r['attribute_connector']:.3f} / 10-NN {r['attribute_knn']:.3f} "
                f"(chance {report['attribute_chance']:.3f})"
            )
        line += f", cosine between values {r['value_cosine']:.3f} / tokens {r['token_cosine']:.3f}"
        lines.append(line)
    return "\n".join(lines)
