"""ComfyUI nodes of the pack. Everything here may import ComfyUI; the methods live in core/."""
from __future__ import annotations

from typing_extensions import override
from comfy_api.latest import ComfyExtension, io

from .attention_control import NODES as ATTENTION_CONTROL_NODES
from .attention_maps import NODES as ATTENTION_MAP_NODES
from .consistory import NODES as CONSISTORY_NODES
from .feature_injection import NODES as FEATURE_INJECTION_NODES
from .inversion import NODES as INVERSION_NODES
from .keyframe_attention import NODES as KEYFRAME_NODES
from .latent_fuser import NODES as LATENT_FUSER_NODES
from .p3s import NODES as P3S_NODES
from .p3s_nodes import NODES as P3S_TRAINING_NODES
from .text2video import NODES as TEXT2VIDEO_NODES


class EditKitExtension(ComfyExtension):
    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [*ATTENTION_MAP_NODES, *ATTENTION_CONTROL_NODES, *INVERSION_NODES, *FEATURE_INJECTION_NODES,
                *LATENT_FUSER_NODES, *KEYFRAME_NODES, *TEXT2VIDEO_NODES, *CONSISTORY_NODES, *P3S_NODES,
                *P3S_TRAINING_NODES]
