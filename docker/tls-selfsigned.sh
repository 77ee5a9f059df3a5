#!/bin/sh
# A self-signed certificate for nginx (docker/nginx/genapi.conf) where none is installed yet:
# HTTPS works from the first start; replace cert.pem and key.pem in the directory with real ones.
set -eu
directory="$1"
mkdir -p "$directory"
if [ -s "$directory/cert.pem" ] && [ -s "$directory/key.pem" ]; then
    exit 0
fi
openssl req -x509 -newkey rsa:2048 -nodes -days 825 -subj "/CN=localhost" \
    -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" \
    -keyout "$directory/key.pem" -out "$directory/cert.pem" 2>/dev/null
chmod 644 "$directory/cert.pem" "$directory/key.pem"
echo "Made a self-signed certificate in $directory (replace cert.pem and key.pem with real ones)"
