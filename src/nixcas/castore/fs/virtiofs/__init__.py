"""The castore filesystem as a virtio-fs device for virtual machines (a vhost-user-fs back-end, pure Python).

- :mod:`.virtqueue` — guest memory and split virtqueues, bounds-checked;
- :mod:`.vhostuser` — the vhost-user messages of one front-end connection;
- :mod:`.server` — the unix socket, one front-end after another, until signalled.
"""
