"""The NATS plumbing: connecting, the embedded server, streams and buckets, durable consumers, users."""
