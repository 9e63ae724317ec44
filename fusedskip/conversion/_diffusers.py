"""diffusers ResnetBlock2D with norm1 and norm2 fused with the SiLU that follows; for
time_embedding_norm="scale_shift" norm2 also takes the time embedding's per-(sample, channel)
scale and shift (``act(norm2(h)·(1 + scale) + shift)``, the Stable Diffusion pattern).

``self.nonlinearity`` is one module called up to three times (after norm1, on the time
embedding, after norm2), so the class is swapped for a subclass whose forward is diffusers'
own (0.42.x, verified by source digest before swapping) minus the calls the fused norms absorb.
"""
from __future__ import annotations

import torch
from diffusers.models.resnet import ResnetBlock2D
from diffusers.utils import deprecate


class FusedResnetBlock2D(ResnetBlock2D):
    """ResnetBlock2D whose norm1 (and norm2 when ``_fusedskip_norm2_act``) apply the activation."""

    _fusedskip_restores_to = ResnetBlock2D
    _fusedskip_norm2_act = False

    def forward(self, input_tensor: torch.Tensor, temb: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if len(args) > 0 or kwargs.get("scale", None) is not None:
            deprecation_message = (
                "The `scale` argument is deprecated and will be ignored. Please remove it, as passing it will raise "
                "an error in the future. `scale` should directly be passed while calling the underlying pipeline "
                "component i.e., via `cross_attention_kwargs`."
            )
            deprecate("scale", "1.0.0", deprecation_message)

        hidden_states = input_tensor
        hidden_states = self.norm1(hidden_states)  # GroupNormAct: norm1 + nonlinearity

        if self.upsample is not None:
            if hidden_states.shape[0] >= 64:
                input_tensor = input_tensor.contiguous()
                hidden_states = hidden_states.contiguous()
            input_tensor = self.upsample(input_tensor)
            hidden_states = self.upsample(hidden_states)
        elif self.downsample is not None:
            input_tensor = self.downsample(input_tensor)
            hidden_states = self.downsample(hidden_states)

        hidden_states = self.conv1(hidden_states)

        if self.time_emb_proj is not None:
            if not self.skip_time_act:
                temb = self.nonlinearity(temb)
            temb = self.time_emb_proj(temb)[:, :, None, None]

        if self.time_embedding_norm == "default":
            if temb is not None:
                hidden_states = hidden_states + temb
            hidden_states = self.norm2(hidden_states)
        elif self.time_embedding_norm == "scale_shift":
            if temb is None:
                raise ValueError(
                    f" `temb` should not be None when `time_embedding_norm` is {self.time_embedding_norm}"
                )
            time_scale, time_shift = torch.chunk(temb, 2, dim=1)
            if self._fusedskip_norm2_act:  # GroupNormAct: act(norm2(h)·(1 + scale) + shift) in one op
                hidden_states = self.norm2(hidden_states, scale=time_scale, shift=time_shift)
            else:
                hidden_states = self.norm2(hidden_states)
                hidden_states = hidden_states * (1 + time_scale) + time_shift
        else:
            hidden_states = self.norm2(hidden_states)

        if not self._fusedskip_norm2_act:
            hidden_states = self.nonlinearity(hidden_states)

        hidden_states = self.dropout(hidden_states)
        hidden_states = self.conv2(hidden_states)

        if self.conv_shortcut is not None:
            if self.training:
                input_tensor = input_tensor.contiguous()
            input_tensor = self.conv_shortcut(input_tensor)

        output_tensor = (input_tensor + hidden_states) / self.output_scale_factor
        return output_tensor
