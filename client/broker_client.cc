// Socket slow path and broker attach (Pool::Connect): implemented with the broker.
