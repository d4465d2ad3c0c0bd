"""EditKit: training-free image and video editing nodes for ComfyUI.

ComfyUI imports this file and awaits `comfy_entrypoint`. The host imports stay inside it so that
`core/` (and its tests) can be imported without ComfyUI.
"""


WEB_DIRECTORY = "./web/js"   # front-end extension: migrates workflows saved with earlier node layouts


async def comfy_entrypoint():
    from .nodes import EditKitExtension
    return EditKitExtension()
