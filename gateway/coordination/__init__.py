"""What processes share to keep their promises together: the channel between the supervisor
and each worker (:mod:`gateway.coordination.channel`)."""
