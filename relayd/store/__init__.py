"""Redis adapter: key names, Lua scripts, the pipelined writer and the readers."""
