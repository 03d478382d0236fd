"""A lean evaluation of a trained ring FNO, for timing the coarse Lorenz 96 step.

At the sizes of the runtime study (``lorenz96_runtime.py``), a call of neuraloperator's
``FNO`` on one state is dominated by overheads: some hundred small tensor operations,
complex ``einsum`` calls that PyTorch turns into permutes, copies and a complex batched matrix
product, and 1 x 1 convolutions that take a generic (im2col) path. :class:`RingFNO`
evaluates the same trained network, with the same weights and the same arithmetic up to
float32 rounding, with fewer and cheaper operations:

- the channel MLPs and skips (1 x 1 convolutions) are matrix products (``addmm``) on
  activations of shape ``(channels, batch K)``;
- the normalisation of the input and of the output is folded into the first lifting and
  the last projection layer (both are affine maps);
- the spectral convolution keeps m Fourier modes (m = 17 at K >= 32). Instead of a full
  real FFT, of which it uses m coefficients, and an inverse FFT of a zero-padded
  spectrum, it applies the truncated real DFT as two matrix products with precomputed
  ``(K, 2m)`` and ``(2m, K)`` cosine/sine bases, O(mK) per channel, exactly the rFFT's
  coefficients with its ``norm="forward"`` scaling; the per-mode complex channel mixing is
  one real batched product with the 2 x 2 block form of each complex weight matrix.

The package itself always calls the library's model; this is a measuring device of the
Lorenz 96 experiments, checked against the model there (relative difference at float32
rounding level). See ``docs/lorenz96.md``, "Making the MNO step faster".
"""

import math

import torch
import torch.nn.functional as nnf


class RingFNO:
    """Evaluate a trained ``NormalizedModel(FNO)`` of the ring on ``(batch, K)`` states.

    Args:
        model: A :class:`~dolfinx_mno.NormalizedModel` around a float32 1D
            ``neuralop.models.FNO`` with the configuration of the demo's ``ring_fno`` (linear
            FNO skips, soft-gating channel-MLP skips, GELU, post-activation, no norm,
            padding or positional embedding) and per-channel (``axis=1``) statistics.

    Shapes:
        ``(batch, K)`` → ``(batch, K)`` for any ``K``, in the input's dtype (float32
        inside).
    """

    def __init__(self, model):
        fno, blocks = model.model, model.model.fno_blocks
        assert fno.positional_embedding is None and fno.domain_padding is None
        assert blocks.norm is None and not blocks.preactivation and blocks.use_channel_mlp
        assert blocks.non_linearity is nnf.gelu and len(fno.n_modes) == 1
        stats = (model.input_normalization, model.output_normalization)
        assert all(s.axis == 1 and s.shift.numel() == 1 for s in stats)

        def matrix(conv):  # a 1x1 convolution's weight, (out, in)
            return conv.weight.detach()[..., 0].clone()

        def column(conv):  # its bias, (out, 1)
            return conv.bias.detach()[:, None].clone()

        shift_in, scale_in = (float(v) for v in (stats[0].shift, stats[0].scale))
        shift_out, scale_out = (float(v) for v in (stats[1].shift, stats[1].scale))
        lift, project = fno.lifting.fcs, fno.projection.fcs
        assert len(lift) == len(project) == 2
        first = matrix(lift[0]) / scale_in  # (x - s) / σ folded into the first layer
        self.lifting = [
            (first, column(lift[0]) - first * shift_in),
            (matrix(lift[1]), column(lift[1])),
        ]
        self.projection = [
            (matrix(project[0]), column(project[0])),
            (matrix(project[1]) * scale_out, column(project[1]) * scale_out + shift_out),
        ]
        self.layers = []
        for i in range(blocks.n_layers):
            conv, gate, mlp = blocks.convs[i], blocks.channel_mlp_skips[i], blocks.channel_mlp[i]
            assert gate.bias is None and len(mlp.fcs) == 2 and not conv.separable
            weight = conv.weight.to_tensor() if hasattr(conv.weight, "to_tensor") else conv.weight
            wr, wi = weight.detach().real, weight.detach().imag  # (in, out, modes)
            # (re x, im x) (wr + i wi) = (re x wr - im x wi, re x wi + im x wr), per mode
            mixing = torch.cat([torch.cat([wr, wi], 1), torch.cat([-wi, wr], 1)], 0)
            self.layers.append(
                (
                    mixing.permute(2, 0, 1).contiguous(),  # (modes, 2 in, 2 out)
                    conv.bias.detach().reshape(-1, 1).clone(),  # spectral bias, (out, 1)
                    matrix(blocks.fno_skips[i].conv),
                    (matrix(mlp.fcs[0]), column(mlp.fcs[0])),
                    (matrix(mlp.fcs[1]), column(mlp.fcs[1])),
                    gate.weight.detach().reshape(-1, 1).clone(),
                )
            )
        self.modes, self.width = self.layers[0][0].shape[0], self.layers[0][2].shape[0]
        self._bases = {}

    def bases(self, num_slow):
        """Truncated real DFT of length K: (m, forward (K, 2m), inverse (2m, K)), float32."""
        if num_slow not in self._bases:
            m = min(self.modes, num_slow // 2 + 1)
            k = torch.arange(num_slow, dtype=torch.float64)
            angle = 2 * math.pi * torch.outer(k, torch.arange(m, dtype=torch.float64)) / num_slow
            cos, sin = torch.cos(angle), torch.sin(angle)
            forward = torch.cat([cos, -sin], 1) / num_slow  # rfft, norm="forward"
            # irfft, norm="forward": modes 0 (and K/2) once, the others twice (conjugates).
            weight = torch.full((m,), 2.0, dtype=torch.float64)
            weight[0] = 1.0
            if num_slow % 2 == 0 and m == num_slow // 2 + 1:
                weight[-1] = 1.0
            inverse = torch.cat([cos.T * weight[:, None], -sin.T * weight[:, None]], 0)
            self._bases[num_slow] = (m, forward.float(), inverse.float().contiguous())
        return self._bases[num_slow]

    def __call__(self, x):
        """The closure of ``x``, shape ``(batch, K)``."""
        batch, num_slow = x.shape
        m, forward, inverse = self.bases(num_slow)
        width = self.width
        h = x.to(torch.float32).reshape(1, batch * num_slow)  # (channels, batch K)
        (w0, b0), (w1, b1) = self.lifting
        h = torch.addmm(b1, w1, nnf.gelu(torch.addmm(b0, w0, h)))
        for i, (mixing, bias, skip, (wa, ba), (wb, bb), gate) in enumerate(self.layers):
            last = i == len(self.layers) - 1
            # Fourier coefficients (re | im) of every channel and state: (width batch, 2m)
            coefficients = torch.mm(h.view(width * batch, num_slow), forward)
            coefficients = coefficients.view(width, batch, 2, m).permute(3, 1, 2, 0)
            mixed = torch.bmm(coefficients.reshape(m, batch, 2 * width), mixing[:m])
            mixed = mixed.view(m, batch, 2, width).permute(3, 1, 2, 0)
            s = torch.addmm(bias, skip, h)  # skip + spectral bias, then the spectral part
            s.view(width * batch, num_slow).addmm_(mixed.reshape(width * batch, 2 * m), inverse)
            if not last:
                s = nnf.gelu(s)
            t = torch.addmm(bb, wb, nnf.gelu(torch.addmm(ba, wa, s)))
            t.addcmul_(gate, h)  # channel-MLP output + soft-gating skip
            h = t if last else nnf.gelu(t)
        (w0, b0), (w1, b1) = self.projection
        h = torch.addmm(b1, w1, nnf.gelu(torch.addmm(b0, w0, h)))
        return h.view(batch, num_slow).to(x.dtype)
