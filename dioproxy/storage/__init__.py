"""Where the cache keeps things.

- :mod:`~dioproxy.storage.base`: the interfaces, a blob store and a metadata store.
- :mod:`~dioproxy.storage.disk`: the cache directory's layout, implementing both.
- :mod:`~dioproxy.storage.cachedir`: the directory read as a whole (scans, tags), for the index and the admin.
- :mod:`~dioproxy.storage.index`: sizes and last uses of every entry, in SQLite.
"""
