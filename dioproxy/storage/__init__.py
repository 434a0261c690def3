"""Where the cache keeps things.

- :mod:`~dioproxy.storage.base`: the interfaces, a blob store and a metadata store.
- :mod:`~dioproxy.storage.layout`: where each thing lies in the cache directory; the store and the scans take
  their paths from it.
- :mod:`~dioproxy.storage.disk`: the store on that directory, implementing both; the cache bound and the admin
  command list and delete entries through it.
- :mod:`~dioproxy.storage.cachedir`: the directory read as a whole (listings, scans, tags), blocking, for the store
  and the index.
- :mod:`~dioproxy.storage.index`: sizes and last uses of every entry, in SQLite.
"""
