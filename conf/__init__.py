"""Hydra configs, shipped inside the package as ``anime_role_detect.conf`` (see ``confutil.CONFIG_DIR``)."""
