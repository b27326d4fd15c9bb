-- A version per customer, for optimistic locking over HTTP: `GET
-- /customers/{id}` gives it as the `ETag`, `PUT /customers/{id}` with
-- `If-Match` applies only while it is unchanged, and every change moves it
-- (customer.updated carries the new one). A registration is version 1;
-- customers that exist already start there too.
ALTER TABLE customers.customers ADD COLUMN version bigint NOT NULL DEFAULT 1;
