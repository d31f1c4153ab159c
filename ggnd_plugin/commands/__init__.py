"""Sub-commands of ``ggnd``: every module here defines ``register(subparsers)``.

A command's ``handler(args)`` returns an exit status and raises :class:`ggnd_plugin.errors.GGNDError`
for problems the user can fix. Import heavy packages inside handlers, not at module level.
"""
