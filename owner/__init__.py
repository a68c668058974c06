"""kbwg.owner: the privileged device owner (the helper run as root) and the frame protocol
the agent speaks to it. Nothing here imports the rest of kbwg: the helper's import set is
this package, msgpack, pynacl and pyroute2."""
