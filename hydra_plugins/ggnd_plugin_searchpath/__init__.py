"""Hydra search-path plugin that exposes ggnd-plugin's SchNetPack config groups to ``spktrain``."""
