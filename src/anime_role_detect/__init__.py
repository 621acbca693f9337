"""anime_role_detect: name the anime and game characters in images and videos.

Layers (data flows one way): config -> data -> models -> recognition -> serve;
workflow and fusion orchestrate them and publish versions through the registry.
"""

__version__ = "0.1.0"
