#!/usr/bin/env bash
# The system packages medaudit's tests need, installed once per machine from Debian's archive.
# `make test` runs this before pytest and `.ci/run` calls `make test`, so a fresh machine needs
# nothing typed by hand. Whatever is already on PATH is skipped; the archive is refreshed at most
# once per run, only when something is missing.
#
#   redis-server          the real Redis of the flag-pipeline tests (.ci/run starts one if none answers)
#   chromium              the HTML audit report, rendered in headless Chromium (tests/integration)
#   promtool, prometheus  alert rules checked and unit-tested, the live dashboard check (tests/deploy)
#   dciodvfy              the DICOM objects the service writes, validated against their IODs (dicom3tools)
#
# Adding a tool: one line in WANTED below (command, then the Debian package that provides it).
set -euo pipefail

WANTED=(
  "redis-server redis-server"
  "chromium chromium"
  "promtool prometheus"
  "prometheus prometheus"
  "dciodvfy dicom3tools"
)

missing=()
for entry in "${WANTED[@]}"; do
  read -r cmd pkg <<<"$entry"
  if ! command -v "$cmd" >/dev/null 2>&1; then
    [[ " ${missing[*]-} " == *" $pkg "* ]] || missing+=("$pkg")
  fi
done
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi

if [ "$(id -u)" -eq 0 ]; then
  sudo=()
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
  sudo=(sudo -n)
else
  echo "medaudit's tests need these Debian packages: ${missing[*]}" >&2
  echo "install them as root:  apt-get update && apt-get install -y ${missing[*]}" >&2
  exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "medaudit's tests need: ${missing[*]} (Debian package names); this machine has no apt-get" >&2
  exit 1
fi

echo "installing system packages for the tests: ${missing[*]}"
# Only the binaries are wanted: a policy-rc.d that refuses keeps the packages (prometheus,
# redis-server) from starting their own daemons, where the machine has no such policy already.
policy=/usr/sbin/policy-rc.d
added_policy=
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' | "${sudo[@]}" tee "$policy" >/dev/null
  "${sudo[@]}" chmod +x "$policy"
  added_policy=1
fi
trap '[ -z "$added_policy" ] || "${sudo[@]}" rm -f "$policy"' EXIT
"${sudo[@]}" apt-get update -qq
"${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
for entry in "${WANTED[@]}"; do
  read -r cmd pkg <<<"$entry"
  command -v "$cmd" >/dev/null 2>&1 || { echo "$pkg installed but $cmd is not on PATH" >&2; exit 1; }
done
