module github.com/fleet-provisioner/helpers/cfssl-authsign

go 1.19
