"""ILQL's value heads beside a causal LM (Snell et al. 2022): the two Q heads, their Polyak-averaged target copies
and the V head (:class:`ILQLHeads`), saved beside the LM as :data:`HEADS_FILE`, and :func:`load_ilql`, which reads
an ``rlhfkit ilql`` output directory back.

They live in ``modeling/`` rather than in :mod:`rlhfkit.ilql` because decoding an ILQL policy needs them as much as
training it does, and the stages that decode one (eval) may not import the ILQL stage.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from torch import nn

from rlhfkit.data.io import atomic_open, fsync_path
from rlhfkit.losses import polyak_update_
from rlhfkit.modeling import models

HEADS_FILE = "ilql_heads.safetensors"
"""The ILQL heads (Q, target Q, V) beside the saved LM; :func:`load_ilql` reads them."""
HEADS_FORMAT = "rlhfkit-ilql-heads/1"
"""The ``format`` entry of :data:`HEADS_FILE`'s metadata."""


def make_head(hidden_size: int, out_size: int) -> nn.Sequential:
    """TRLX's ``make_head``: ``Linear(h, 2h) -> ReLU -> Linear(2h, out)`` (default PyTorch init)."""
    return nn.Sequential(nn.Linear(hidden_size, 2 * hidden_size), nn.ReLU(), nn.Linear(2 * hidden_size, out_size))


class ILQLHeads(nn.Module):
    """V, Q and target-Q heads on the LM's final hidden states.

    The target heads start as copies of the Q heads and never get a gradient (``requires_grad`` False);
    :meth:`sync_targets` moves them. ``train_forwards`` (a saved buffer) counts the training forwards, so the
    target-update schedule survives a resume from a checkpoint.
    """

    train_forwards: torch.Tensor

    def __init__(self, hidden_size: int, vocab_size: int, *, two_qs: bool = True):
        super().__init__()
        self.hidden_size, self.vocab_size, self.two_qs = hidden_size, vocab_size, two_qs
        self.v_head = make_head(hidden_size, 1)
        self.q_heads = nn.ModuleList(make_head(hidden_size, vocab_size) for _ in range(2 if two_qs else 1))
        self.target_q_heads = copy.deepcopy(self.q_heads)
        self.target_q_heads.requires_grad_(False)
        self.register_buffer("train_forwards", torch.zeros((), dtype=torch.long))

    def forward(self, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(qs (H, K, V), target_qs (H, K, V), values (K,))`` for ``states`` (K, hidden), fp32 values."""
        qs = torch.stack([head(states) for head in self.q_heads])
        with torch.no_grad():
            target_qs = torch.stack([head(states) for head in self.target_q_heads])
        values = self.v_head(states).squeeze(-1).float()
        return qs, target_qs, values

    @torch.no_grad()
    def decode_values(self, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(min over the target Q heads (..., V), V (...,))`` for ``states`` (..., hidden): what decoding perturbs
        the logits by (TRLX's ``generate``)."""
        target_q = torch.stack([head(states) for head in self.target_q_heads]).min(0).values
        return target_q.float(), self.v_head(states).squeeze(-1).float()

    def sync_targets(self, alpha: float) -> None:
        """target <- (1 - alpha) target + alpha Q, every parameter (:func:`rlhfkit.losses.polyak_update_`)."""
        polyak_update_(list(self.target_q_heads.parameters()), list(self.q_heads.parameters()), alpha)


def save_heads(heads: ILQLHeads, path: str | Path, state_dict: dict | None = None) -> None:
    """Write the heads as safetensors (atomically), their sizes in the metadata."""
    from safetensors.torch import save

    tensors = {k: v.detach().cpu().contiguous() for k, v in (state_dict or heads.state_dict()).items()}
    metadata = {
        "format": HEADS_FORMAT,
        "hidden_size": str(heads.hidden_size),
        "vocab_size": str(heads.vocab_size),
        "two_qs": json.dumps(heads.two_qs),
    }
    with atomic_open(path, binary=True) as f:
        f.write(save(tensors, metadata=metadata))
    fsync_path(Path(path).parent)


def load_heads(path: str | Path) -> ILQLHeads:
    """The :class:`ILQLHeads` saved by :func:`save_heads`."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    if metadata.get("format") != HEADS_FORMAT:
        raise models.ModelLoadError(f"{path} is not an rlhfkit ILQL heads file (format {metadata.get('format')!r})")
    heads = ILQLHeads(int(metadata["hidden_size"]), int(metadata["vocab_size"]), two_qs=bool(json.loads(metadata["two_qs"])))
    heads.load_state_dict(load_file(str(path)))
    return heads


def is_ilql_dir(spec: str | Path) -> bool:
    """Whether ``spec`` is a directory ``rlhfkit ilql`` wrote (it holds :data:`HEADS_FILE` beside the LM)."""
    return (Path(spec) / HEADS_FILE).is_file()


def load_ilql(path: str | Path):
    """``(lm, heads)`` of a directory ``rlhfkit ilql`` wrote, both in eval mode: the LM through
    ``from_pretrained``, the heads from :data:`HEADS_FILE`."""
    path = Path(path)
    if not is_ilql_dir(path):
        raise models.ModelLoadError(f"{path} has no {HEADS_FILE}: not an ILQL output directory")
    lm = models.load_causal_lm(str(path))
    heads = load_heads(path / HEADS_FILE)
    lm.eval()
    heads.eval()
    return lm, heads
