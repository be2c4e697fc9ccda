module tuner/foreign/go

go 1.19
