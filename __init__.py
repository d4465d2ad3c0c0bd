"""EditKit: training-free image and video editing nodes for ComfyUI.

ComfyUI imports this file and awaits `comfy_entrypoint`. The host imports stay inside it so that
`core/` (and its tests) can be imported without ComfyUI.
"""


# Served at /extensions/<pack folder>/: js/ holds the front-end extension (migrates workflows saved with earlier
# node layouts; ComfyUI loads every .js file under this folder as an extension), docs/ the node help pages the
# front end's help panel reads (docs/<node_id>.md) and their figures.
WEB_DIRECTORY = "./web"


async def comfy_entrypoint():
    from .nodes import EditKitExtension
    return EditKitExtension()
