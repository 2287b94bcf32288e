"""The TinyAlign VLM: vision tower, connector, RAG connector, LLM.

    features = vlm.image_features(pixel_values)   # (Bi, P, Dv) frozen tower, once a batch
    H_V = connector(features)                             # (Bi, P, H)
    H_R = rag_connector(E_R.view(Bi, k*32, 96))            # (Bi, k*32, H) in rank order
    LLM([text before <image>, H_V, H_R, text after])       # labels -100 on H_V and H_R

The vision tower is the frozen one the memory bank was built with (``bankd.models``),
so query keys come from the same features through the bank's own key function. One
component per attribute; ``save_pretrained`` writes each on its own.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from bankd.models.encoders import DualEncoder

from .conversation import IGNORE_INDEX, IMAGE_PLACEHOLDER_ID


@dataclass(frozen=True)
class TinyAlignConfig:
    """What a TinyAlign VLM is made of (saved as config.json next to its weights)."""

    vision: str = "tiny"
    vision_seed: int = 0
    llm: str = "tiny"
    connector: str = "mlp2x_gelu"
    rag_connector: str = "mlp2x_gelu"
    retrieval: bool = True
    top_k: int = 5
    retrieval_mode: str = "topk"  # "shuffled": the study's control (retrieval.Retriever)
    feature_layer: int = -2
    value_shape: tuple[int, int] = (32, 96)
    template: str = "plain"
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> TinyAlignConfig:
        d = json.loads(text)
        d["value_shape"] = tuple(d["value_shape"])
        return cls(**d)


def _mlp(depth: int) -> Any:
    def build(d_in: int, d_out: int) -> nn.Module:
        layers: list[nn.Module] = [nn.Linear(d_in, d_out)]
        for _ in range(depth - 1):
            layers += [nn.GELU(), nn.Linear(d_out, d_out)]
        return nn.Sequential(*layers)

    return build


def _wide_mlp(hidden: int) -> Any:
    def build(d_in: int, d_out: int) -> nn.Module:
        return nn.Sequential(nn.Linear(d_in, hidden), nn.GELU(), nn.Linear(hidden, d_out))

    return build


CONNECTORS = {"linear": _mlp(1), "mlp2x_gelu": _mlp(2), "mlp3x_gelu": _mlp(3)}
WIDE_PREFIX = "mlp2x_gelu_h"  # mlp2x_gelu_h<N>: hidden width N instead of the output width


def build_connector(spec: str, d_in: int, d_out: int) -> nn.Module:
    """A connector from a short spec string (``mlp2x_gelu``: Linear-GELU-Linear;
    ``mlp2x_gelu_h512``: the same with a 512-wide hidden layer, the study's ``wider``)."""
    if spec in CONNECTORS:
        return CONNECTORS[spec](d_in, d_out)
    hidden = spec.removeprefix(WIDE_PREFIX)
    if spec.startswith(WIDE_PREFIX) and hidden.isdigit() and int(hidden) > 0:
        return _wide_mlp(int(hidden))(d_in, d_out)
    known = sorted(CONNECTORS) + [f"{WIDE_PREFIX}<N>"]
    raise ValueError(f"unknown connector {spec!r} (choose from {known})")


class TinyAlignVLM(nn.Module):
    """Vision tower + connector (+ RAG connector) + causal LM."""

    def __init__(self, config: TinyAlignConfig, vision: DualEncoder, llm: nn.Module) -> None:
        super().__init__()
        self.config = config
        self.vision = vision  # frozen, eval; DualEncoder ignores .train()
        width = llm.get_input_embeddings().embedding_dim
        self.connector = build_connector(config.connector, vision.vision_dim, width)
        self.rag_connector = (
            build_connector(config.rag_connector, config.value_shape[1], width)
            if config.retrieval
            else None
        )
        self.llm = llm

    # -- features ----------------------------------------------------------------------

    @torch.no_grad()
    def image_features(
        self, pixel_values: torch.Tensor, precision: str | None = None
    ) -> torch.Tensor:
        """Frozen patch features (Bi, P, Dv) float32 of the configured layer.

        ``precision``: the tower runs in exactly that (a bank's ``feature_precision``, so
        query keys equal its stored keys); None: under the caller's autocast."""
        return self.vision.image_features(pixel_values, precision=precision).float()

    # -- sequence assembly -------------------------------------------------------------

    def assemble(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor | None,
        features: torch.Tensor | None,
        image_rows: torch.Tensor | None,
        retrieved: torch.Tensor | None = None,
        retrieved_mask: torch.Tensor | None = None,
        pad_left: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """inputs_embeds (B, T', H), attention_mask (B, T'), labels (B, T') with
        [H_V, H_R] spliced in at each image row's placeholder.

        retrieved: values (Bi, k, 32, 96) for the image rows (None without retrieval);
        retrieved_mask: (Bi, k) False for missing hits, whose 32 tokens get no attention.
        """
        embed = self.llm.get_input_embeddings()
        text = embed(input_ids.clamp(min=0))  # (B, T, H); placeholder embedded as id 0, cut below
        dtype = text.dtype
        visual: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        if features is not None and image_rows is not None and len(image_rows):
            h_v = self.connector(features.to(dtype))  # (Bi, P, H)
            tokens, mask = [h_v], [torch.ones(h_v.shape[:2], dtype=torch.bool, device=h_v.device)]
            if self.rag_connector is not None:
                if retrieved is None:
                    raise ValueError("this model was built with retrieval: pass retrieved values")
                bi, k, n_lat, d_lat = retrieved.shape  # (Bi, k, 32, 96)
                h_r = self.rag_connector(retrieved.to(dtype).reshape(bi, k * n_lat, d_lat))
                m = (
                    torch.ones(bi, k, dtype=torch.bool, device=h_r.device)
                    if retrieved_mask is None
                    else retrieved_mask.to(h_r.device, torch.bool)
                )
                tokens.append(h_r)
                mask.append(m.repeat_interleave(n_lat, dim=1))  # (Bi, k*32)
            h, hm = torch.cat(tokens, 1), torch.cat(mask, 1)
            for i, row in enumerate(image_rows.tolist()):
                visual[row] = (h[i], hm[i])
        seqs, masks, labs = [], [], []
        for b in range(input_ids.shape[0]):
            keep = attention_mask[b].bool()
            ids_b, emb_b = input_ids[b][keep], text[b][keep]
            lab_b = labels[b][keep] if labels is not None else None
            m_b = torch.ones(len(ids_b), dtype=torch.bool, device=emb_b.device)
            where = (ids_b == IMAGE_PLACEHOLDER_ID).nonzero().flatten()
            if b in visual:
                if len(where) != 1:
                    raise ValueError(f"row {b} has an image but {len(where)} image placeholders")
                p = int(where[0])
                v, vm = visual[b]
                emb_b = torch.cat([emb_b[:p], v, emb_b[p + 1 :]])
                m_b = torch.cat([m_b[:p], vm, m_b[p + 1 :]])
                if lab_b is not None:
                    ignore = torch.full(
                        (len(v),), IGNORE_INDEX, dtype=lab_b.dtype, device=lab_b.device
                    )
                    lab_b = torch.cat([lab_b[:p], ignore, lab_b[p + 1 :]])
            elif len(where):
                raise ValueError(f"row {b} has an image placeholder but no image")
            seqs.append(emb_b), masks.append(m_b), labs.append(lab_b)
        return _pad(seqs, masks, labs if labels is not None else None, pad_left)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor | None = None,
        features: torch.Tensor | None = None,
        image_rows: torch.Tensor | None = None,
        retrieved: torch.Tensor | None = None,
        retrieved_mask: torch.Tensor | None = None,
    ) -> Any:
        embeds, mask, labs = self.assemble(
            input_ids, attention_mask, labels, features, image_rows, retrieved, retrieved_mask
        )
        return self.llm(inputs_embeds=embeds, attention_mask=mask.long(), labels=labs)

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        features: torch.Tensor | None = None,
        image_rows: torch.Tensor | None = None,
        retrieved: torch.Tensor | None = None,
        retrieved_mask: torch.Tensor | None = None,
        **generate_kwargs: Any,
    ) -> torch.Tensor:
        """New token ids (B, T_new); prompts are left-padded after assembly."""
        embeds, mask, _ = self.assemble(
            input_ids,
            attention_mask,
            None,
            features,
            image_rows,
            retrieved,
            retrieved_mask,
            pad_left=True,
        )
        return self.llm.generate(
            inputs_embeds=embeds, attention_mask=mask.long(), **generate_kwargs
        )

    # -- saving ------------------------------------------------------------------------

    def save_pretrained(
        self,
        directory: str | Path,
        *,
        save_llm: bool,
        state: dict[str, torch.Tensor] | None = None,
    ) -> Path:
        """config.json, connector.safetensors, rag_connector.safetensors, llm/ (stage 2).

        ``state``: the whole model's gathered state dict (a sharded model's, ``fsdp.py``),
        saved instead of the modules' own tensors."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)

        def part(name: str) -> dict[str, torch.Tensor]:
            if state is None:
                return _cpu_state(getattr(self, name))
            prefix = name + "."
            return {
                k[len(prefix) :]: v.contiguous() for k, v in state.items() if k.startswith(prefix)
            }

        (directory / "config.json").write_text(self.config.to_json())
        save_file(part("connector"), directory / "connector.safetensors")
        if self.rag_connector is not None:
            save_file(part("rag_connector"), directory / "rag_connector.safetensors")
        if save_llm:
            self.llm.save_pretrained(
                directory / "llm",
                safe_serialization=True,
                state_dict=part("llm") if state is not None else None,
            )
        return directory

    def load_components(self, directory: str | Path) -> None:
        """Load connector and RAG connector weights saved by ``save_pretrained``."""
        directory = Path(directory)
        self.connector.load_state_dict(load_file(directory / "connector.safetensors"))
        if self.rag_connector is not None:
            self.rag_connector.load_state_dict(load_file(directory / "rag_connector.safetensors"))


def _cpu_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in module.state_dict().items()}


def _pad(
    seqs: list[torch.Tensor],
    masks: list[torch.Tensor],
    labels: list[torch.Tensor] | None,
    pad_left: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    t = max(len(s) for s in seqs)
    width = seqs[0].shape[-1]
    out = seqs[0].new_zeros(len(seqs), t, width)
    mask = torch.zeros(len(seqs), t, dtype=torch.bool, device=out.device)
    labs = (
        None
        if labels is None
        else torch.full((len(seqs), t), IGNORE_INDEX, dtype=torch.long, device=out.device)
    )
    for i, s in enumerate(seqs):
        sl = slice(t - len(s), t) if pad_left else slice(0, len(s))
        out[i, sl], mask[i, sl] = s, masks[i]
        if labs is not None:
            labs[i, sl] = labels[i]
    return out, mask, labs
