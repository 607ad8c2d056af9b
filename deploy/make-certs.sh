#!/usr/bin/env bash
# Make a private CA, a server certificate for the SuperLink / reverse proxy, and one
# SuperNode authentication key per site. Usage:
#   deploy/make-certs.sh OUT_DIR SERVER_DNS_NAME [SITE_ID ...]
# e.g. deploy/make-certs.sh /etc/medisyn/pki fl.coordinator.example.org breast-us fundus
# Keep ca.key offline. Give each site ca.pem and its own site-<id>-key only.
set -euo pipefail
out=${1:?usage: make-certs.sh OUT_DIR SERVER_DNS_NAME [SITE_ID ...]}
dns=${2:?usage: make-certs.sh OUT_DIR SERVER_DNS_NAME [SITE_ID ...]}
shift 2
mkdir -p "$out"
umask 077
cd "$out"
if [[ ! -f ca.key ]]; then
  openssl req -x509 -newkey rsa:4096 -sha256 -days 3650 -nodes \
    -keyout ca.key -out ca.pem -subj "/CN=MediSyn federation CA"
fi
cat > server.ext <<EXT
basicConstraints = CA:FALSE
keyUsage = digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = DNS:${dns}, DNS:localhost, IP:127.0.0.1
EXT
openssl req -newkey rsa:4096 -sha256 -nodes -keyout superlink.key -out superlink.csr -subj "/CN=${dns}"
openssl x509 -req -in superlink.csr -CA ca.pem -CAkey ca.key -CAcreateserial \
  -out superlink.pem -days 825 -sha256 -extfile server.ext
rm -f superlink.csr server.ext
for site in "$@"; do
  # SuperNode authentication key (EC, OpenSSH format), as flower-supernode expects.
  if [[ ! -f "site-${site}-key" ]]; then
    ssh-keygen -q -t ecdsa -b 384 -N "" -f "site-${site}-key" -C "medisyn-site-${site}"
  fi
  echo "enrol on the coordinator: [sites.${site}] public_key = \"${out}/site-${site}-key.pub\" in federation.toml"
done
chmod 600 ./*.key site-*-key 2>/dev/null || true
chmod 644 ca.pem superlink.pem ./*.pub 2>/dev/null || true
echo "wrote CA, server certificate and site keys to ${out}"
