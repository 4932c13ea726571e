"""The wire protocol: documents, manifest, names, schemas and errors. No I/O but reading shipped files."""
