"""taichi_neus: NeuS-style neural implicit surfaces in Taichi, on a CPU, Vulkan or (untested) CUDA and Metal.

The package reads as the pipeline, each folder a stage that imports only from earlier ones:
``data`` (photos, cameras, rays) → ``field`` (hash grid, MLPs, the SDF field) → ``render``
(sampling, NeuS compositing, images) → ``train`` (config, samplers, losses, optimiser, trainer) →
``export`` (meshes, PLY, evaluation) → ``app`` (the ``taichi-neus`` command, run folders, preview).
``runtime``, ``buffers``, ``memory`` and ``errors`` serve every stage.

The names a user needs are importable from here; importing the package loads nothing heavy (each
name is imported on first use), and no Taichi runtime starts until :func:`init` is called::

    import taichi_neus as tn
    tn.init("cpu")
    scene = tn.load_scene("path/to/scene", downscale=4)
    trainer = tn.Trainer(scene, tn.Config(), "runs/x")
    trainer.fit()
    tn.mesh_from_run(trainer).save("runs/x/mesh.ply")
"""

from importlib import import_module

__version__ = "0.1.0"

# short name -> (module, attribute)
_PUBLIC = {
    "init": ("taichi_neus.runtime", "init"),
    "Scene": ("taichi_neus.data.scene", "Scene"),
    "load_scene": ("taichi_neus.data.loader", "load_scene"),
    "load_dtu": ("taichi_neus.data.dtu", "load_dtu"),
    "default_scene_path": ("taichi_neus.data.synthetic", "default_scene_path"),
    "SDFField": ("taichi_neus.field.sdf_field", "SDFField"),
    "FieldConfig": ("taichi_neus.field.sdf_field", "FieldConfig"),
    "HashGrid": ("taichi_neus.field.hash_grid", "HashGrid"),
    "NeuSCompositor": ("taichi_neus.render.compositing", "NeuSCompositor"),
    "render_image": ("taichi_neus.render.images", "render_image"),
    "Renderer": ("taichi_neus.render.torch_ops", "Renderer"),
    "field_forward": ("taichi_neus.field.torch_ops", "field_forward"),
    "composite": ("taichi_neus.render.torch_ops", "composite"),
    "TapeField": ("taichi_neus.field.tape_ops", "TapeField"),
    "TapeCompositor": ("taichi_neus.render.tape_ops", "TapeCompositor"),
    "Config": ("taichi_neus.train.config", "Config"),
    "Trainer": ("taichi_neus.train.trainer", "Trainer"),
    "Mesh": ("taichi_neus.export.mesh", "Mesh"),
    "extract_mesh": ("taichi_neus.export.mesh", "extract_mesh"),
    "mesh_from_run": ("taichi_neus.export.mesh", "mesh_from_run"),
}

__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str):
    if name in _PUBLIC:
        module, attr = _PUBLIC[name]
        value = getattr(import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'taichi_neus' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
