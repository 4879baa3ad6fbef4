"""Dataset digests: a Git-style Merkle tree per dataset, kept up to date cheaply and served to peers.

::

    hashing    node encodings (chunk, file, symlink, directory) and the hash algorithm (BLAKE3, SHA-256)
    selection  include/exclude globs
    throttle   the read-bandwidth limit
    reading    path-safe opening under a dataset root, chunked hashing of one file
    cache      SQLite cache of file digests by (size, mtime_ns, inode); roots and generations
    trees      one scan: walk, reuse or hash each file, assemble directory nodes, detect settling
    pool       the scan's hashing threads: large files in spans of whole chunks, while the walk goes on
    scanner    the agent's loop: incremental and deep scans off the event loop, publish ``DatasetDigest``
    __main__   ``python -m agent.digests PATH``: print a directory's root, for a manifest file

The controller compares roots and localises differences (``detectors/digests.py``) over the agent's
HTTP (``agent/peer_api.py``).
"""
