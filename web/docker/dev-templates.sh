#!/bin/sh
# Renders the local front (nginx/dev/*.template, mounted at
# /etc/nginx/dev-templates) into conf.d, as the image's own step does for
# /etc/nginx/templates. Only the front's variables are substituted, so
# nginx's own $variables stay as they are.
set -eu
for template in /etc/nginx/dev-templates/*.template; do
    [ -f "$template" ] || continue
    target="/etc/nginx/conf.d/$(basename "$template" .template)"
    echo "$0: rendering $template to $target"
    envsubst '${NGINX_DEV_LISTEN} ${NGINX_DEV_WEB_ROOT} ${NGINX_DEV_EDGE}' \
        < "$template" > "$target"
done
