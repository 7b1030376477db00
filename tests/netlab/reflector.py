"""A STUN-like UDP reflector, run as a program inside a lab namespace.

    python reflector.py PORT

Each datagram is answered, to its source, with the datagram followed by `` IP:PORT`` — the
source address the reflector observed (for a host behind a NAT: its mapping). Printing
``ready PORT`` on stdout means the socket is bound. Stdin takes commands, one a line:
``send IP PORT PAYLOAD`` sends PAYLOAD from the reflector's socket (answers ``sent``), so a test
can have a contacted endpoint send to a host at a moment of its choosing. EOF on stdin ends it.
"""

import select
import socket
import sys


def main(argv):
    port = int(argv[1])
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("0.0.0.0", port))
    print("ready", sock.getsockname()[1], flush=True)
    while True:
        readable, _, _ = select.select([sock, sys.stdin], [], [])
        if sock in readable:
            data, (ip, src_port) = sock.recvfrom(2048)
            sock.sendto(data + f" {ip}:{src_port}".encode(), (ip, src_port))
        if sys.stdin in readable:
            line = sys.stdin.readline()
            if not line:
                return 0
            words = line.split()
            if len(words) == 4 and words[0] == "send":
                sock.sendto(words[3].encode(), (words[1], int(words[2])))
                print("sent", flush=True)
            else:
                print("error", line.strip(), flush=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
