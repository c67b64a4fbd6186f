"""Exact per-window gradients, and the exact per-window clipped sum, of the character LSTM without vmap.

``torch.func.vmap`` has no batching rule for the fused LSTM kernel (``aten::mkldnn_rnn_layer``) and falls back
to a loop over the windows, with a warning: DP-SGD measured 12-20x the time of a plain step on the demo's
LSTM. Here the windows stay one batch, and the gradient is written out by hand:

1. Forward, without autograd: each layer runs through the fused kernel (``torch.lstm``, one layer at a time,
   so every layer's output sequence is kept). The gate pre-activations of all timesteps are then recomputed
   in one matmul from the layer's input and its previous outputs h_{t-1}, and the cell states by a scan
   (c_t = f_t c_{t-1} + i_t g_t).
2. Backward through time, by hand, on the whole batch: one small matmul and four elementwise products a
   timestep give the gradient of every gate pre-activation, dL/dz_t (B, 4H). Each window's loss is its own
   mean cross-entropy over its non-PAD targets (as ``masked_cross_entropy`` computes it for a batch of one),
   and the windows' losses are summed, so each row of dL/dz_t belongs to one window alone.
3. Each weight's gradient is a sum over time of outer products of such a gradient with the weight's input:
   for window b, dW_ih = sum_t dz_t ⊗ x_t, dW_hh = sum_t dz_t ⊗ h_{t-1}, both biases sum_t dz_t, the head's
   sum_t dlogits_t ⊗ h_t, and the embedding's rows the gradient at its output added at each code.

The parameters, their names and the flat Layout are nn.LSTM's own: nothing about the model changes, only how
its gradient is computed for DP-SGD.

DP-SGD needs no per-window gradient itself, only each window's norm and the clipped sum. Materializing the
gradients (batch × parameters floats: 33 MB for one recurrent weight at hidden 256 and 32 windows, written
into fresh memory every step) costs more than the step's arithmetic, so
:meth:`LSTMWindowGradients.clipped_sum` takes each weight's per-window norm from the same factors
(||sum_t a_t ⊗ x_t||² = sum_{t,s} (a_t·a_s)(x_t·x_s), the "ghost" norm of Li et al. 2022, where the T×T
products are smaller than the outer products) and the clipped sum as one matmul over all windows and
timesteps, each window's rows scaled by its clip factor. Both are exact: the numbers of clipping materialized
gradients, to float rounding. A layer's W_ih and W_hh are handled as one
weight [W_ih | W_hh] over the input [x_t, h_{t-1}]; its two biases get the same gradient.

Measured (one thread, this repository's 2-core machine; a plain step on the demo's LSTM, hidden 128, batch 10,
about 21 ms): the per-window gradients alone took 48 ms this way and 80 ms by autograd over an unrolled cell
loop over the same parameters (one autograd node per cell operation, two thousand a step); at hidden 256,
batch 32, 569 and 666 ms against a 236 ms plain step. The whole DP-SGD step is in RESULTS.md section 19.
Not tried: torch.compile (a C++ compiler at every site, and a compile per shape) and Opacus' DPLSTM (other
parameter names and layout).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from confide.data.tokenize import PAD
from confide.models.common import IGNORE_INDEX, input_codes
from confide.models.lstm import CharLSTM


@dataclass
class _Layer:
    inputs: Tensor
    """The layer's input at every timestep beside its previous output h_{t-1} (zeros at t = 0), time-major:
    (T, B, in + H), the input of W_ih and W_hh side by side."""
    grad: Tensor
    """dL/dz, the gradient of the gate pre-activations (T, B, 4H), filled by the backward pass."""


@dataclass
class _Tape:
    codes: Tensor
    """The embedding's input codes (B, T)."""
    embedded: Tensor
    """dL/d(embedding output) (T, B, E)."""
    layers: list[_Layer]
    top: Tensor
    """The last layer's outputs (T, B, H): the head's input."""
    logits: Tensor
    """dL/dlogits (T, B, V)."""
    losses: Tensor
    """Each window's loss (B,)."""


def _weight_norms(grad: Tensor, inputs: Tensor) -> Tensor:
    """Squared norms (B,) of the per-window gradients sum_t grad_t ⊗ inputs_t of a weight, from time-major
    (T, B, ·) factors; without materializing the gradients when the T×T products are smaller."""
    time, _, outs = grad.shape
    ins = inputs.shape[2]
    grad, inputs = grad.transpose(0, 1), inputs.transpose(0, 1)
    if outs * ins <= time * (outs + ins):
        return torch.bmm(grad.transpose(1, 2), inputs).square().sum((1, 2))
    gram = torch.bmm(grad, grad.transpose(1, 2)) * torch.bmm(inputs, inputs.transpose(1, 2))
    return gram.sum((1, 2)).clamp(min=0.0)


def _weight_sum(grad: Tensor, inputs: Tensor, factors: Tensor) -> Tensor:
    """sum_b factors_b · sum_t grad_tb ⊗ inputs_tb, as one matmul over all windows and timesteps."""
    scaled = grad * factors[:, None]
    return scaled.flatten(0, 1).t() @ inputs.flatten(0, 1)


def _per_window(grad: Tensor, inputs: Tensor) -> Tensor:
    """The per-window gradients (B, out, in) of a weight from time-major factors."""
    return torch.bmm(grad.permute(1, 2, 0), inputs.transpose(0, 1))


class LSTMWindowGradients:
    """Per-window gradients of a :class:`~confide.models.lstm.CharLSTM` (its embedding, nn.LSTM and head),
    by a hand-written backward pass over the whole batch. Reads the model's current parameters each call."""

    def __init__(self, model: CharLSTM) -> None:
        lstm = model.lstm
        if lstm.bidirectional or lstm.proj_size or not lstm.batch_first or lstm.dropout:
            raise ValueError("LSTMWindowGradients needs a CharLSTM: a batch-first, one-way nn.LSTM")
        self.model = model
        self.lstm = lstm
        self.embed: nn.Embedding = model.embed
        self.head: nn.Linear = model.head
        self.layers = lstm.num_layers

    def _weights(self, k: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        lstm = self.lstm
        return (
            getattr(lstm, f"weight_ih_l{k}"),
            getattr(lstm, f"weight_hh_l{k}"),
            getattr(lstm, f"bias_ih_l{k}"),
            getattr(lstm, f"bias_hh_l{k}"),
        )

    def _widths(self, k: int) -> list[int]:
        """The widths of layer k's input and of its hidden state: W_ih's and W_hh's columns."""
        return [self._weights(k)[0].shape[1], self.lstm.hidden_size]

    @torch.no_grad()
    def tape(self, inputs: Tensor, targets: Tensor) -> _Tape:
        """Forward and backward over a batch (B, T): what every per-window gradient is made of.

        Time-major inside (T, B, ...), so that each timestep's slice of the loops is contiguous."""
        codes = input_codes(inputs)
        batch, time = codes.shape
        hidden = self.lstm.hidden_size
        x = self.embed.weight[codes.t()]
        zeros = x.new_zeros(1, batch, hidden)
        layers, saved = [], []
        for k in range(self.layers):
            w_ih, w_hh, b_ih, b_hh = self._weights(k)
            h = torch.lstm(x, (zeros, zeros), [w_ih, w_hh, b_ih, b_hh], True, 1, 0.0, False, False, False)[0]
            both = torch.cat([x, torch.cat([zeros, h[:-1]])], 2)
            # The gate pre-activations z_t = W_ih x_t + W_hh h_{t-1} + b, in PyTorch's gate order i, f, g, o.
            z = torch.addmm(b_ih + b_hh, both.flatten(0, 1), torch.cat([w_ih, w_hh], 1).t())
            z = z.view(time, batch, 4, hidden)
            act = torch.sigmoid(z)
            act[:, :, 2] = torch.tanh(z[:, :, 2])
            i, f, g, o = act.unbind(2)
            ig = i * g
            c = torch.empty_like(ig)
            c[0] = ig[0]
            for t in range(1, time):
                torch.addcmul(ig[t], f[t], c[t - 1], out=c[t])
            tanh_c = torch.tanh(c)
            c_previous = torch.cat([zeros, c[:-1]])
            # dL/dz of each gate as a factor times dL/dc_t (i, f, g) or dL/dh_t (o).
            gates = torch.stack(
                [g * i * (1 - i), c_previous * f * (1 - f), i * (1 - g * g), tanh_c * o * (1 - o)], 2
            )
            through_c = o * (1 - tanh_c * tanh_c)  # dL/dc_t gets dL/dh_t · o_t (1 - tanh² c_t)
            f_next = torch.cat([f[1:], zeros])
            layers.append(_Layer(both, x.new_empty(time, batch, 4 * hidden)))
            saved.append((gates, through_c, f_next, w_ih, w_hh))
            x = h

        head = self.head
        logits = torch.addmm(head.bias, x.flatten(0, 1), head.weight.t()).view(time, batch, -1)
        # Each window's mean cross-entropy over its non-PAD targets; the sum over windows is differentiated.
        targets = targets.t()
        keep = (targets != PAD) & (targets != IGNORE_INDEX)
        safe = targets.long().masked_fill(~keep, 0).unsqueeze(2)
        count = keep.sum(0).clamp(min=1)
        log_p = torch.log_softmax(logits, -1)
        losses = -(log_p.gather(2, safe).squeeze(2) * keep).sum(0) / count
        d_logits = log_p.exp_()
        d_logits.scatter_add_(2, safe, d_logits.new_full(safe.shape, -1.0))
        d_logits *= (keep / count).unsqueeze(2).to(d_logits.dtype)

        d_out = (d_logits.flatten(0, 1) @ head.weight).view(time, batch, hidden)
        for layer, (gates, through_c, f_next, w_ih, w_hh) in zip(
            reversed(layers), reversed(saved), strict=True
        ):
            dz = layer.grad.view(time, batch, 4, hidden)
            dz_cell, dz_out = dz[:, :, :3].unbind(0), dz[:, :, 3].unbind(0)
            gates_cell, gates_out = gates[:, :, :3].unbind(0), gates[:, :, 3].unbind(0)
            outer, grads = d_out.unbind(0), layer.grad.unbind(0)
            through, forget = through_c.unbind(0), f_next.unbind(0)
            dc = x.new_zeros(batch, hidden)
            for t in reversed(range(time)):
                dh = outer[t] if t == time - 1 else torch.addmm(outer[t], grads[t + 1], w_hh)
                dc = torch.addcmul(dc * forget[t], dh, through[t])
                torch.mul(gates_cell[t], dc.unsqueeze(1), out=dz_cell[t])
                torch.mul(gates_out[t], dh, out=dz_out[t])
            d_out = (layer.grad.flatten(0, 1) @ w_ih).view(time, batch, -1)
        return _Tape(codes, d_out, layers, x, d_logits, losses)

    def _embedding(self, tape: _Tape) -> Tensor:
        """The embedding's per-window gradients (B, V, E): small, since E is."""
        weight = self.embed.weight
        batch, time = tape.codes.shape
        index = tape.codes.unsqueeze(2).expand(batch, time, weight.shape[1])
        return weight.new_zeros(batch, *weight.shape).scatter_add_(1, index, tape.embedded.transpose(0, 1))

    @torch.no_grad()
    def gradients(self, inputs: Tensor, targets: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        """Per-window gradients {name: (B, *shape)} and per-window losses (B,) for a batch (B, T)."""
        tape = self.tape(inputs, targets)
        out = {"embed.weight": self._embedding(tape)}
        for k, layer in enumerate(tape.layers):
            w_ih, w_hh = _per_window(layer.grad, layer.inputs).split(self._widths(k), 2)
            out[f"lstm.weight_ih_l{k}"] = w_ih.contiguous()
            out[f"lstm.weight_hh_l{k}"] = w_hh.contiguous()
            out[f"lstm.bias_ih_l{k}"] = layer.grad.sum(0)
            out[f"lstm.bias_hh_l{k}"] = layer.grad.sum(0)
        out["head.weight"] = _per_window(tape.logits, tape.top)
        out["head.bias"] = tape.logits.sum(0)
        return out, tape.losses

    @torch.no_grad()
    def clipped_sum(
        self, inputs: Tensor, targets: Tensor, max_grad_norm: float
    ) -> tuple[dict[str, Tensor], Tensor, Tensor]:
        """The sum over windows of each window's gradient clipped to L2 norm ``max_grad_norm``, as Opacus'
        DPOptimizer clips (factor min(1, C / (norm + 1e-6))); with the per-window norms and losses (B,)."""
        tape = self.tape(inputs, targets)
        embedding = self._embedding(tape)
        squares = [embedding.square().sum((1, 2)), tape.logits.sum(0).square().sum(1)]
        squares.append(_weight_norms(tape.logits, tape.top))
        for layer in tape.layers:
            squares.append(2 * layer.grad.sum(0).square().sum(1))  # the two biases, equal
            squares.append(_weight_norms(layer.grad, layer.inputs))  # W_ih and W_hh side by side
        norms = torch.stack(squares, 1).sum(1).sqrt()
        factors = (max_grad_norm / (norms + 1e-6)).clamp(max=1.0)

        out = {"embed.weight": torch.einsum("b,bve->ve", factors, embedding)}
        for k, layer in enumerate(tape.layers):
            both = _weight_sum(layer.grad, layer.inputs, factors)
            w_ih, w_hh = both.split(self._widths(k), 1)
            out[f"lstm.weight_ih_l{k}"] = w_ih.contiguous()
            out[f"lstm.weight_hh_l{k}"] = w_hh.contiguous()
            out[f"lstm.bias_ih_l{k}"] = factors @ layer.grad.sum(0)
            out[f"lstm.bias_hh_l{k}"] = out[f"lstm.bias_ih_l{k}"].clone()
        out["head.weight"] = _weight_sum(tape.logits, tape.top, factors)
        out["head.bias"] = factors @ tape.logits.sum(0)
        return out, norms, tape.losses
