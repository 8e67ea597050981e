"""Hosted repositories: images and artifacts clients push, kept beside the cache and never proxied.

`names` says which repository names are hosted, `index` keeps what each repository holds (one
SQLite file, every write one transaction), `repository` composes it with a content store of
its own and the uploads, `uploads` stages blobs on disk, `gc` drops what nothing references.
"""
