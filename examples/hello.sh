#!/bin/sh
echo hello from nixcas
