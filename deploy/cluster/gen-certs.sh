#!/bin/sh
# Certificates for the shoal NATS cluster: a private CA, a server certificate the nodes share, and
# client certificates for mutual TLS. Needs only openssl (1.1.1 or later).
#
#   deploy/cluster/gen-certs.sh server DIR NAME...   the CA (made once, then reused) and the server certificate
#   deploy/cluster/gen-certs.sh client DIR NAME      a client certificate for NAME (mutual TLS only)
#
# NAME: every host name or IP address that clients or the other nodes dial; the first is also the
# subject's CN. For docker-compose.cluster.yml:
#   deploy/cluster/gen-certs.sh server deploy/cluster/local nats-1 nats-2 nats-3 localhost 127.0.0.1
# For deploy/k8s (namespace shoal):
#   deploy/cluster/gen-certs.sh server deploy/k8s/local nats-0.nats-headless nats-1.nats-headless \
#     nats-2.nats-headless '*.nats-headless.shoal.svc' '*.nats-headless.shoal.svc.cluster.local' localhost 127.0.0.1
#
# Writes, under DIR:
#   ca/ca.pem, ca/ca-key.pem                 the CA. Its key signs certificates and nothing else needs it:
#                                            keep it off the servers (nothing here mounts ca/).
#   tls/ca.pem, tls/server.pem, tls/server-key.pem
#                                            what every node mounts at /etc/nats/tls, and ca.pem is what
#                                            every client gets as SHOAL_NATS_TLS_CA
#   clients/NAME.pem, clients/NAME-key.pem   a client certificate (SHOAL_NATS_TLS_CERT, SHOAL_NATS_TLS_KEY)
#
# The server certificate is good for both ends of a route (serverAuth and clientAuth): the nodes
# authenticate each other's routes with it. Running `server` again replaces it (a rotation: apply it
# with `nats-server --signal reload` on every node); the CA stays until you delete DIR/ca.
set -eu

DAYS_CA=3650
DAYS_LEAF=730

usage() {
    sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

[ $# -ge 3 ] || usage
command -v openssl > /dev/null || { echo "gen-certs.sh: openssl not found" >&2; exit 1; }
action=$1 dir=$2
shift 2
umask 077
mkdir -p "$dir/ca"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# A minimal openssl config, so that the system's openssl.cnf adds nothing of its own.
cat > "$work/req.cnf" <<'EOF'
[req]
distinguished_name = dn
prompt = no
[dn]
[ca]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
EOF

new_key() {
    openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2> /dev/null
}

# sign CN EXTFILE KEY OUT: a certificate for KEY, signed by the CA.
sign() {
    openssl req -new -key "$3" -subj "/CN=$1" -config "$work/req.cnf" -out "$work/leaf.csr"
    openssl x509 -req -in "$work/leaf.csr" -CA "$dir/ca/ca.pem" -CAkey "$dir/ca/ca-key.pem" \
        -set_serial "0x$(openssl rand -hex 16)" -days "$DAYS_LEAF" -extfile "$2" -out "$4" 2> /dev/null
    chmod 644 "$4"
}

if [ ! -f "$dir/ca/ca-key.pem" ]; then
    new_key "$dir/ca/ca-key.pem"
    openssl req -x509 -new -key "$dir/ca/ca-key.pem" -subj "/CN=shoal NATS CA" -days "$DAYS_CA" \
        -config "$work/req.cnf" -extensions ca -out "$dir/ca/ca.pem"
    chmod 644 "$dir/ca/ca.pem"
    echo "wrote $dir/ca/ca.pem and $dir/ca/ca-key.pem (the CA; keep its key safe)"
fi

case $action in
server)
    sans=""
    for name in "$@"; do
        case $name in
        *[!0-9.]* | "") case $name in *:*) kind=IP ;; *) kind=DNS ;; esac ;;  # IPv6 has colons
        *) kind=IP ;;                                                         # digits and dots: IPv4
        esac
        sans="${sans:+$sans,}$kind:$name"
    done
    cat > "$work/leaf.ext" <<EOF
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth, clientAuth
subjectAltName = $sans
EOF
    mkdir -p "$dir/tls"
    new_key "$work/server-key.pem"
    sign "$1" "$work/leaf.ext" "$work/server-key.pem" "$work/server.pem"
    cp "$dir/ca/ca.pem" "$dir/tls/ca.pem"
    chmod 644 "$dir/tls/ca.pem"
    mv "$work/server-key.pem" "$dir/tls/server-key.pem"
    mv "$work/server.pem" "$dir/tls/server.pem"
    echo "wrote $dir/tls/ca.pem, server.pem and server-key.pem for $sans"
    ;;
client)
    [ $# -eq 1 ] || usage
    cat > "$work/leaf.ext" <<EOF
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = clientAuth
EOF
    mkdir -p "$dir/clients"
    new_key "$dir/clients/$1-key.pem"
    sign "$1" "$work/leaf.ext" "$dir/clients/$1-key.pem" "$dir/clients/$1.pem"
    echo "wrote $dir/clients/$1.pem and $1-key.pem"
    ;;
*)
    usage
    ;;
esac
