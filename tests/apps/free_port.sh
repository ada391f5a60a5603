# free_port: prints a TCP port nothing on this machine listens on now (the OS picks it), for a
# Gloo rendezvous (MASTER_PORT). Tests that run at once (ctest -j) never share one, as they could
# when each derived its port from its process id.
free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
